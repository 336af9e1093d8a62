"""Configuration from ``OBSLEDGER_*`` environment variables."""

from __future__ import annotations

import contextlib
import ipaddress
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

from domain.raw_data import DEFAULT_PACKAGE_SIZE_LIMIT
from infra.passwords import development_secret, password_problem, secret_problem

#: Files and directories of the data directory: for the service's user only.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
#: SQLite's side files (write-ahead log, shared memory, rollback journal).
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, the port made explicit."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    return scheme, parts.hostname.lower(), parts.port or (443 if scheme == "https" else 80)


def tighten(path: Path, mode: int) -> None:
    """Give an existing file or directory of ours ``mode`` if it grants more (older versions
    left them 0644/0755)."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        st = path.stat()
        if st.st_uid == os.geteuid() and st.st_mode & 0o777 & ~mode:
            path.chmod(mode)


def private_file(path: Path) -> None:
    """Make sure ``path`` exists with mode 0600 before a library (SQLite, eventsourcing)
    creates it with the process umask: SQLite gives its -wal, -shm and -journal files the
    mode of the database file, so they are 0600 too."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
    for p in (path, *(path.with_name(path.name + side) for side in SQLITE_SIDE_FILES)):
        tighten(p, PRIVATE_FILE_MODE)


class Settings(BaseSettings):
    """Every setting can be given as ``OBSLEDGER_<NAME>`` (e.g. ``OBSLEDGER_STORE=postgres``)."""

    model_config = SettingsConfigDict(env_prefix="OBSLEDGER_", extra="ignore")

    log_format: Literal["json", "text"] = Field(
        "json", description="Logs: one JSON object per line (command and correlation ids on "
        "every line), or plain text.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    mode: Literal["development", "production"] = Field(
        "development", description="production refuses to start without OBSLEDGER_JWT_SECRET.")
    jwt_secret: SecretStr | None = Field(
        None, description="Signs every token (HS256): at least 32 characters and not "
        "guessable (zxcvbn: at least 10^24 guesses; 32 spaces or a repeated word are refused). "
        "Development default: a random secret kept in <data_dir>/jwt-secret.")
    token_ttl_s: float = Field(1800.0, gt=0, le=86_400, description="User tokens' lifetime.")
    admin_password: SecretStr | None = Field(
        None, description="Password of the local `admin` account created when no admin "
        "exists (it must pass the rule of every password: docs/ACCOUNTS.md); default: a "
        "random one written to <data_dir>/admin-password (mode 0600).")
    auth_refresh_s: float = Field(
        1.0, gt=0, description="How stale the in-memory view of accounts and revoked service "
        "tokens may be (other processes' changes show within this).")
    auth_rate_limit: str = Field(
        "10/minute", description="Failed logins (POST /auth/token) allowed per username; "
        "beyond, every attempt gets 429 until the window moves on.")
    auth_rate_limit_per_client: str = Field(
        "60/minute", description="Failed logins allowed per client address.")
    auth_password_checks: int = Field(
        4, ge=1, le=64, description="Password checks and hashes (argon2id, ~64 MiB each) run "
        "at once; logins beyond wait in a short queue.")
    auth_password_queue: int = Field(
        16, ge=0, le=10_000, description="Password checks that may wait for one of the "
        "above; beyond, a login answers 503 with Retry-After (never an unbounded queue).")
    forwarded_allow_ips: str = Field(
        "", description="Reverse proxies (comma-separated IP addresses or networks, `*` for "
        "any) whose X-Forwarded-For / X-Forwarded-Proto are believed: the client address of "
        "rate limits and of the request audit log. Default: none (the peer address).")
    cors_origins: str = Field(
        "", description="Browser origins (comma-separated, e.g. "
        "`https://dashboard.example.org,http://localhost:3000`, or `*`) allowed to call the "
        "API from another origin (CORS, preflight answered). Default: none.")
    gzip_minimum_bytes: int = Field(
        1000, ge=0, description="Responses at least this large are gzip-compressed for "
        "clients that accept it.")
    stream_connections_per_account: int = Field(
        16, ge=1, le=10_000, description="Open `/stream` connections one account may hold; "
        "beyond, 429 with Retry-After (a dashboard needs one per open page).")
    request_audit_flush_s: float = Field(
        0.5, gt=0, description="The request audit log is written in batches this often.")
    request_audit_buffer: int = Field(
        100_000, ge=100, description="Audit records held while the database is unreachable "
        "(beyond this the oldest not yet taken by the writer are dropped, and counted).")
    store: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="Event store: embedded SQLite (default) or PostgreSQL."
    )
    data_dir: Path = Field(Path("var"), description="Where SQLite files and the journal live.")
    postgres_host: str = "127.0.0.1"
    postgres_port: int = 5432
    postgres_user: str = "postgres"
    postgres_password: str = ""
    postgres_dbname: str = "obsledger"
    postgres_connect_timeout: int = 5
    read_model_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the read models; default: the PostgreSQL event store "
        "database, or a SQLite file beside the embedded event store.",
    )
    journal_path: Path | None = Field(None, description="Default: <data_dir>/journal.sqlite3")
    journal_slots: bool = Field(
        False, description="One of several API processes sharing the data directory (set by "
        "`serve --workers N`; replicas set it): each claims its own journal, "
        "<journal>-<n>.sqlite3, reads the others' (idempotency keys, per-entity order), "
        "adopts the journal of one that died, and one leader runs the projector and the "
        "other single workers (docs/OPERATIONS.md).")

    embedded_workers: bool = Field(
        True, description="Run the dispatcher and the projector inside the API process."
    )
    embedded_projector: bool = Field(
        True, description="With embedded workers, also run the projector in the API process "
        "(false when a separate `obsledger project` service keeps the read models).",
    )
    dispatch_batch_size: int = Field(500, ge=1, le=10_000)
    dispatch_retry_max_s: float = Field(5.0, gt=0, description="Backoff cap, store down.")
    missing_target_deadline_s: float = Field(
        30.0, ge=0, description="How long a command whose target does not exist is retried."
    )
    projection_page_size: int = Field(1000, ge=1, le=50_000)
    projection_poll_s: float = Field(0.5, gt=0, description="Polling fallback interval.")
    rebuild_workers: int | None = Field(
        None, ge=1, le=256, description="Decoder processes of `obsledger rebuild` and "
        "`check-projections` (default: CPUs - 1; 1 decodes in the rebuilding process)."
    )
    min_position_wait_s: float = Field(
        2.0, ge=0, description="Longest a query waits for min_position."
    )
    sync_wait_s: float = Field(
        10.0, ge=0, description="Longest a ?wait=true command waits to be applied."
    )
    package_size_limit_bytes: int = Field(DEFAULT_PACKAGE_SIZE_LIMIT, ge=0)
    result_debounce_s: float = Field(
        60.0, ge=0, description="An observation result is rebuilt this long after its last "
        "contributing asset (a burst of assets → one processing run).")
    processing_retry_limit: int = Field(3, ge=0, le=100, description="Retries of a failed "
                                        "processing run before the result stays FAILED.")
    embedded_results_automation: bool = Field(
        True, description="With embedded workers, run the results process manager and "
        "scheduler in the API process (false when `obsledger results` runs them).")
    results_scheduler_interval_s: float = Field(
        5.0, gt=0, description="How often the scheduler looks for results due a rebuild.")
    processing_retry_base_s: float = Field(
        60.0, gt=0, description="First retry delay of a failed run; doubles each time.")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_bulk_files: int = Field(100_000, ge=1)

    ready_max_journal_depth: int = Field(
        50_000, ge=0, description="GET /ready fails above this many pending commands.")
    ready_max_oldest_pending_s: float = Field(
        300.0, ge=0, description="… or when the oldest pending command is older than this.")
    ready_max_projector_lag_events: int = Field(
        100_000, ge=0, description="… or when the read models lag more events than this.")
    ready_max_projector_lag_s: float = Field(
        300.0, ge=0, description="… or when their oldest missing event is older than this.")
    ready_max_relay_lag_s: float = Field(
        600.0, ge=0, description="… or (with Kafka) when the relay lags longer than this.")
    health_probe_s: float = Field(
        0.5, gt=0, le=60, description="How often the API checks that the event store and the "
        "read-model database answer (a connection of its own per store, short timeouts): "
        "while one does not, requests do not try it (docs/OPERATIONS.md, \"During an outage\").")
    health_budget_s: float = Field(
        0.05, gt=0, le=10, description="Longest /health, /ready and /metrics wait for figures "
        "read from the stores; later figures are left out (null, absent gauges).")

    audit_anchor_every: int = Field(
        10_000, ge=1, description="Anchor the audit chain's head outside the database every "
        "this many events (anchors file, and Kafka when configured).")
    audit_anchors_path: Path | None = Field(
        None, description="The append-only anchors file; default <data_dir>/audit-anchors.jsonl")
    embedded_audit_chain: bool = Field(
        True, description="With embedded workers, keep the audit chain in the API process.")

    kafka_bootstrap: str | None = Field(
        None, description="Kafka bootstrap servers (host:port, comma-separated). When set, the "
        "API process also runs the relay that publishes every stored event to Kafka.",
    )
    kafka_topic_prefix: str = Field(
        "obsledger", pattern=r"^[A-Za-z0-9._-]{1,100}$",
        description="Topics are <prefix>.<aggregate type>, e.g. obsledger.executed_obs_unit.",
    )
    kafka_partitions: int = Field(6, ge=1, le=1000, description="Partitions of new topics.")
    kafka_replication_factor: int = Field(1, ge=1, le=10)
    embedded_relay: bool = Field(
        True, description="With embedded workers and OBSLEDGER_KAFKA_BOOTSTRAP, run the relay "
        "in the API process (false when a separate `obsledger relay` service runs it).",
    )
    relay_batch_size: int = Field(2000, ge=1, le=100_000)
    relay_poll_s: float = Field(0.2, gt=0, description="Relay polling fallback interval.")
    relay_retry_max_s: float = Field(5.0, gt=0, description="Relay backoff cap, broker down.")
    relay_flush_timeout_s: float = Field(30.0, gt=0)
    relay_verify_s: float = Field(
        5.0, gt=0, description="How often the relay proves that Kafka still holds what it "
        "published (it reads back the last record it wrote to each partition; also at start "
        "and after any failure, before sending again).")
    projection_source: Literal["log", "kafka"] = Field(
        "log", description="Where projectors read events: the event store's notification log "
        "(default), or the relay's Kafka topics in a consumer group (scale-out; needs "
        "OBSLEDGER_KAFKA_BOOTSTRAP and a running relay).",
    )
    kafka_consumer_group: str = Field(
        "obsledger-projector", pattern=r"^[A-Za-z0-9._-]{1,200}$",
        description="Consumer group of the Kafka projectors sharing one read-model database.",
    )

    # -- MAST archive: search and downloads ----------------------------------------------
    mast_base_url: str = Field(
        "https://mast.stsci.edu", pattern=r"^https?://[^\s]+$",
        description="The MAST server: searches (astroquery's portal API) and downloads "
        "(<url>/api/v0.1/Download/file?uri=<dataURI>).")
    mast_timeout_s: float = Field(60.0, gt=0, description="Timeout of one MAST search.")
    mast_download_hosts: str = Field(
        "https://archive.stsci.edu,https://stpubdata.s3.amazonaws.com",
        description="Where a download may be redirected to, besides the MAST base URL's own "
        "scheme, host and port: comma-separated origins (scheme://host[:port]); STScI's "
        "archive host and its public cloud bucket by default. A redirect anywhere else fails "
        "the job, nothing fetched.")
    download_root: Path | None = Field(
        None, description="Every download lands below this directory; default "
        "<data_dir>/downloads. Destinations that leave it are refused (422).")
    download_chunk_bytes: int = Field(
        5 * 1024 * 1024, ge=64 * 1024, description="Bytes per HTTP Range request.")
    download_concurrent_files: int = Field(3, ge=1, le=64, description="Files fetched at once.")
    download_connections_per_file: int = Field(
        4, ge=1, le=16, description="Range requests of one file in flight at once (each of "
        "one chunk, written in order; a server that ignores Range gets one request at a "
        "time). Several connections beat a per-connection cap on long-haul links.")
    download_retries: int = Field(3, ge=0, le=100, description="Retries of a failed request "
                                  "(reset whenever bytes arrive).")
    download_backoff_base_s: float = Field(
        1.0, ge=0, description="First retry delay; doubles each retry, with full jitter.")
    download_backoff_max_s: float = Field(30.0, ge=0)
    download_read_timeout_s: float = Field(60.0, gt=0, description="Longest silence of a "
                                           "connection before it counts as failed.")
    download_checkpoint_chunks: int = Field(
        2, ge=1, description="Checkpoint (fsync + event) every this many chunks' bytes …")
    download_checkpoint_s: float = Field(5.0, gt=0, description="… or this many seconds.")
    download_on_changed_file: Literal["restart", "fail"] = Field(
        "restart", description="A file whose ETag/Last-Modified/size changed between two "
        "requests: fetch it again from byte 0, or fail the job.")
    download_retention_days: float = Field(
        7.0, ge=0, description="Partial files of cancelled or failed jobs are removed after "
        "this long.")
    download_poll_s: float = Field(1.0, gt=0, description="How often the downloader looks for "
                                   "jobs to start, pause or cancel.")
    embedded_downloader: bool = Field(
        True, description="With embedded workers, run the MAST downloader in the API process "
        "(false when `obsledger downloader` runs it).")

    # -- processing jobs (docs/PROCESSING.md) -------------------------------------------
    processing_lease_s: float = Field(
        60.0, gt=0, le=86_400, description="A worker's lease on a processing job; renewed "
        "every third of it while the job runs. Another worker may take over a job whose "
        "lease expired (its worker was killed or hangs).")
    processing_max_attempts: int = Field(
        3, ge=1, le=100, description="Attempts (claims) of a processing job before it fails.")
    processing_poll_s: float = Field(1.0, gt=0, description="How often an idle processing "
                                     "worker looks for jobs to claim.")
    processing_progress_interval_s: float = Field(
        1.0, ge=0, description="At most one progress command per job this often.")
    processing_default_algorithm: str = Field(
        "ccd_stack", description="The algorithm of processing runs the results scheduler "
        "starts (its latest version, default parameters).")
    processing_catalog_runs: bool = Field(
        True, description="Catalog (publish) the products of the results scheduler's runs.")
    processing_work_root: Path | None = Field(
        None, description="Work directories of running jobs; default <data_dir>/work.")
    embedded_processing_worker: bool = Field(
        True, description="With embedded workers, run a processing worker in the API process "
        "(false when `obsledger worker` processes run the jobs).")

    @property
    def processing_work_dir(self) -> Path:
        return self.processing_work_root or self.data_dir / "work"

    # -- processing pipeline: the object store (docs/PROCESSING.md, "Storage") ------------
    object_store: Literal["local", "s3"] = Field(
        "local", description="Where raw data, intermediate results and products are kept: a "
        "local directory (embedded default) or an S3-protocol store (MinIO, AWS S3).")
    object_store_dir: Path | None = Field(
        None, description="The local object store's directory; default <data_dir>/objects.")
    s3_endpoint_url: str | None = Field(
        None, pattern=r"^https?://[^\s]+$", description="The S3 server, e.g. "
        "http://minio:9000; unset: AWS S3.")
    s3_public_endpoint_url: str | None = Field(
        None, pattern=r"^https?://[^\s]+$", description="The S3 server as download clients "
        "reach it (presigned URLs are signed for it); default: OBSLEDGER_S3_ENDPOINT_URL.")
    s3_access_key_id: str | None = Field(
        None, description="Unset: boto3's usual credential chain (environment, profile, role).")
    s3_secret_access_key: SecretStr | None = None
    s3_region: str = "us-east-1"
    s3_bucket_raw: str = Field("obsledger-raw", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
                               description="Bucket of raw data files (created if missing).")
    s3_bucket_intermediate: str = Field(
        "obsledger-intermediate", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        description="Bucket of intermediate results (master frames, ...).")
    s3_bucket_products: str = Field(
        "obsledger-products", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        description="Bucket of data products. Areas given the same bucket share it under "
        "<area>/ prefixes.")
    s3_multipart_chunk_bytes: int = Field(
        8 * 1024 * 1024, ge=5 * 1024 * 1024, description="Files above this go up in parts "
        "of this size (S3's minimum part is 5 MiB).")
    s3_connect_timeout_s: float = Field(5.0, gt=0, description="Connect timeout of one S3 "
                                        "request (3 attempts before the store counts as down).")
    raw_data_root: Path | None = Field(
        None, description="Where raw data files' relative paths resolve on the instrument "
        "host; default <data_dir>/raw.")

    @property
    def object_store_root(self) -> Path:
        return self.object_store_dir or self.data_dir / "objects"

    @property
    def raw_data_dir(self) -> Path:
        return self.raw_data_root or self.data_dir / "raw"

    @property
    def download_dir(self) -> Path:
        return self.download_root or self.data_dir / "downloads"

    @model_validator(mode="after")
    def _production_needs_a_secret(self) -> Settings:
        if self.jwt_secret is not None:
            problem = secret_problem(self.jwt_secret.get_secret_value())
            if problem is not None:
                raise ValueError(f"OBSLEDGER_JWT_SECRET {problem}")
        if self.mode == "production" and self.jwt_secret is None:
            raise ValueError("OBSLEDGER_MODE=production refuses to start without "
                             "OBSLEDGER_JWT_SECRET (the development secret is not for production)")
        if self.admin_password is not None:
            problem = password_problem(self.admin_password.get_secret_value(), "admin")
            if problem is not None:
                raise ValueError(f"OBSLEDGER_ADMIN_PASSWORD {problem}")
        return self

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxies(cls, v: str) -> str:
        for item in (i.strip() for i in v.split(",")):
            if item and item != "*" and not item.startswith("unix:"):
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"{item!r} is not an IP address or network") from None
        return v

    @field_validator("cors_origins")
    @classmethod
    def _cors(cls, v: str) -> str:
        for item in (i.strip() for i in v.split(",")):
            if item and item != "*":
                parts = urlsplit(item)
                origin(item)
                if parts.path not in ("", "/") or parts.query or parts.fragment:
                    raise ValueError(f"{item!r} is not an origin (scheme://host[:port])")
        return v

    @property
    def cors_origin_list(self) -> list[str]:
        """OBSLEDGER_CORS_ORIGINS as a list (empty: no cross-origin browser access)."""
        return [i.strip().rstrip("/") for i in self.cors_origins.split(",") if i.strip()]

    @field_validator("mast_download_hosts")
    @classmethod
    def _origins(cls, v: str) -> str:
        for item in (i.strip() for i in v.split(",")):
            if item:
                origin(item)
        return v

    @property
    def trusted_proxies(self) -> list[str]:
        """OBSLEDGER_FORWARDED_ALLOW_IPS as a list (empty: no forwarded header believed)."""
        return [i.strip() for i in self.forwarded_allow_ips.split(",") if i.strip()]

    @property
    def download_origins(self) -> frozenset[tuple[str, str, int]]:
        """Where a download may go: the MAST base URL's origin and OBSLEDGER_MAST_DOWNLOAD_HOSTS."""
        return frozenset([origin(self.mast_base_url), *(
            origin(i) for i in self.mast_download_hosts.split(",") if i.strip())])

    @model_validator(mode="after")
    def _kafka_projection_needs_a_broker(self) -> Settings:
        if self.projection_source == "kafka" and not self.kafka_bootstrap:
            raise ValueError("OBSLEDGER_PROJECTION_SOURCE=kafka needs OBSLEDGER_KAFKA_BOOTSTRAP")
        return self

    @property
    def kafka_bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in (self.kafka_bootstrap or "").split(",") if s.strip()]

    @property
    def anchors_file(self) -> Path:
        return self.audit_anchors_path or self.data_dir / "audit-anchors.jsonl"

    @property
    def journal_file(self) -> Path:
        return self.journal_path or self.data_dir / "journal.sqlite3"

    @property
    def accounts_cache_file(self) -> Path:
        """The last accounts snapshot read (a restart during a database outage starts with it)."""
        return self.data_dir / "accounts-snapshot.json"

    @property
    def event_store_file(self) -> Path:
        return self.data_dir / "events.sqlite3"

    @property
    def read_model_database_url(self) -> str:
        if self.read_model_url:
            return self.read_model_url
        if self.store == "postgres":
            return self.event_store_database_url  # the same database
        return f"sqlite:///{(self.data_dir / 'read_models.sqlite3').resolve()}"

    @property
    def event_store_database_url(self) -> str:
        """The event store's database as a SQLAlchemy URL (its availability probe)."""
        if self.store == "postgres":
            pw = f":{self.postgres_password}" if self.postgres_password else ""
            return (
                f"postgresql+psycopg://{self.postgres_user}{pw}@{self.postgres_host}:"
                f"{self.postgres_port}/{self.postgres_dbname}"
            )
        return f"sqlite:///{self.event_store_file.resolve()}"

    def event_store_env(self) -> dict[str, str]:
        """The ``eventsourcing`` environment for the configured store."""
        if self.store == "postgres":
            return {
                "PERSISTENCE_MODULE": "eventsourcing.postgres",
                "APPLICATION_RECORDER_TOPIC": "infra.event_store:ChunkedInsertRecorder",
                "POSTGRES_DBNAME": self.postgres_dbname,
                "POSTGRES_HOST": self.postgres_host,
                "POSTGRES_PORT": str(self.postgres_port),
                "POSTGRES_USER": self.postgres_user,
                "POSTGRES_PASSWORD": self.postgres_password,
                "POSTGRES_CONNECT_TIMEOUT": str(self.postgres_connect_timeout),
                "POSTGRES_PRE_PING": "y",
                "POSTGRES_POOL_SIZE": "4",
                "POSTGRES_LOCK_TIMEOUT": "10",
            }
        return {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(self.event_store_file.resolve()),
            "SQLITE_LOCK_TIMEOUT": "10",
        }

    def environment(self) -> dict[str, str]:
        """These settings as ``OBSLEDGER_*`` variables (to start another obsledger process)."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value is not None:
                env[f"OBSLEDGER_{name.upper()}"] = (str(value).lower() if isinstance(value, bool)
                                                    else str(value))
        return env

    def signing_secret(self) -> str:
        if self.jwt_secret is not None:
            return self.jwt_secret.get_secret_value()
        return development_secret(self.data_dir)

    def prepare_dirs(self) -> None:
        """The data directory (0700) and the SQLite files of the journal, the event store and
        the read models (0600, with their -wal/-shm): argon2 hashes, the request audit and
        every command are for the service's user only."""
        self.data_dir.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        tighten(self.data_dir, PRIVATE_DIR_MODE)
        self.journal_file.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        private_file(self.journal_file)
        if self.store == "sqlite":
            private_file(self.event_store_file)
        url = make_url(self.read_model_database_url)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            path = Path(url.database)
            path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
            private_file(path)
        for path in (self.data_dir / "jwt-secret", self.data_dir / "admin-password",
                     self.accounts_cache_file, self.anchors_file):
            tighten(path, PRIVATE_FILE_MODE)
