"""The read-model tables (SQLAlchemy Core). A set can be built under another name for rebuilds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.schema import SchemaItem

Json = JSON().with_variant(JSONB(), "postgresql")
TZ = DateTime(timezone=True)

READ_MODELS = ("executed_obs_units", "raw_data_files", "raw_data_packages", "staging_requests",
               "observation_results", "observation_result_tasks", "processing_runs",
               "download_jobs", "download_files", "processing_jobs", "processing_job_steps",
               "data_products", "product_inputs")


@dataclass(frozen=True)
class ReadModelTables:
    """One set of read-model tables; ``generation`` names a shadow set during a rebuild."""

    metadata: MetaData
    executed_obs_units: Table
    raw_data_files: Table
    raw_data_packages: Table
    staging_requests: Table
    observation_results: Table
    observation_result_tasks: Table
    processing_runs: Table
    download_jobs: Table
    download_files: Table
    processing_jobs: Table
    processing_job_steps: Table
    data_products: Table
    product_inputs: Table
    generation: str

    def all(self) -> list[Table]:
        """The tables, in the order of ``READ_MODELS``."""
        return [self.executed_obs_units, self.raw_data_files, self.raw_data_packages,
                self.staging_requests, self.observation_results, self.observation_result_tasks,
                self.processing_runs, self.download_jobs, self.download_files,
                self.processing_jobs, self.processing_job_steps, self.data_products,
                self.product_inputs]


def _id() -> Column[object]:
    """The row's id: its entity's UUID."""
    return Column("id", String(36), primary_key=True)


def _ref(name: str, required: bool = False) -> Column[object]:
    """The UUID of another entity."""
    return Column(name, String(36), nullable=not required)


def _status() -> Column[object]:
    return Column("status", String(20), nullable=False)


def _span(began: str, ended: str) -> list[Column[object]]:
    """When a piece of work began (always known) and ended (null until it has)."""
    return [Column(began, TZ, nullable=False), Column(ended, TZ)]


def _file_description() -> list[Column[object]]:
    """A raw data file as registered: name, instrument, where it is, size, checksum."""
    return [
        Column("name", String(255), nullable=False),
        Column("instrument", String(100), nullable=False),
        Column("relative_path", String(1024), nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("checksum_algorithm", String(20), nullable=False),
        Column("checksum_value", String(128), nullable=False),
    ]


def _algorithm(required: bool) -> list[Column[object]]:
    """The algorithm a processing job ran (or will run), its version and parameters."""
    return [
        Column("algorithm", String(100), nullable=not required),
        Column("algorithm_version", String(50), nullable=not required),
        Column("parameters", Json, nullable=False),
    ]


def _result_run() -> list[Column[object]]:
    """The observation result and processing run a job or product belongs to, if any."""
    return [_ref("result_id"), _ref("run_id")]


def _common() -> list[Column[object]]:
    return [
        Column("created_position", BigInteger, nullable=False),
        Column("last_position", BigInteger, nullable=False),
        Column("last_command_id", String(255), nullable=False),
        Column("last_actor", String(255), nullable=False),
        Column("recorded_at", TZ, nullable=False),
        Column("updated_at", TZ, nullable=False),
    ]


def _read_model(name: str, md: MetaData, *items: SchemaItem) -> Table:
    """A read-model table: its id first, then ``items``' columns and the columns every read
    model has (positions, last command and actor, times); ``items``' indexes and
    constraints."""
    columns = [i for i in items if isinstance(i, Column)]
    return Table(name, md, _id(), *columns, *_common(),
                 *(i for i in items if not isinstance(i, Column)))


def build_tables(generation: str = "", table_suffix: str = "") -> ReadModelTables:
    """Table objects named ``<model><table_suffix>``, indexes named after ``generation``."""
    md = MetaData()
    g = generation or "live"

    def name(base: str) -> str:
        return base + table_suffix

    units = _read_model(
        name("executed_obs_units"), md,
        Column("obs_unit_id", String(100), nullable=False),
        Column("instrument", String(100), nullable=False),
        _status(),
        Column("start_time", TZ, nullable=False),
        Column("end_time", TZ),
        Column("metadata", Json, nullable=False),
        Column("finish_metadata", Json),
        Column("started_by", String(255), nullable=False),
        Column("finished_by", String(255)),
        Index(f"ix_eou_obs_unit_{g}", "obs_unit_id"),
        Index(f"ix_eou_status_start_{g}", "status", "start_time"),
        Index(f"ix_eou_instrument_start_{g}", "instrument", "start_time"),
        Index(f"ix_eou_start_{g}", "start_time"),
    )
    files = _read_model(
        name("raw_data_files"), md,
        *_file_description(),
        _ref("executed_obs_unit_id"),
        _ref("package_id"),
        Column("file_type", String(50), nullable=False),
        Column("created_at", TZ, nullable=False),
        UniqueConstraint("instrument", "name", name=f"uq_rdf_instrument_name_{g}"),
        Index(f"ix_rdf_eou_{g}", "executed_obs_unit_id"),
        Index(f"ix_rdf_package_{g}", "package_id"),
        Index(f"ix_rdf_created_{g}", "created_at"),
    )
    packages = _read_model(
        name("raw_data_packages"), md,
        Column("name", String(255), nullable=False),
        _ref("executed_obs_unit_id"),
        _status(),
        Column("total_size", BigInteger, nullable=False),
        Column("file_count", Integer, nullable=False),
        Column("finalized_at", TZ),
        Index(f"ix_rdp_eou_{g}", "executed_obs_unit_id"),
    )
    staging = _read_model(
        name("staging_requests"), md,
        Column("package_ids", Json, nullable=False),
        Column("destination", String(1024), nullable=False),
        _status(),
        Column("bytes_total", BigInteger, nullable=False),
        Column("files_total", Integer, nullable=False),
        Column("bytes_transferred", BigInteger, nullable=False),
        Column("files_transferred", Integer, nullable=False),
        Column("message", Text),
        Index(f"ix_stg_status_{g}", "status"),
    )
    results = _read_model(
        name("observation_results"), md,
        Column("observation_id", BigInteger, nullable=False),
        Column("request_id", BigInteger, nullable=False),
        Column("epoch_index", Integer, nullable=False),
        Column("sample_index", Integer, nullable=False),
        Column("copy_index", Integer, nullable=False),
        Column("instrument_id", String(100)),
        Column("copies_mode", String(20), nullable=False),
        Column("not_before", TZ),
        Column("spec_snapshot", Json),
        Column("fulfillment_status", String(30), nullable=False),
        Column("fulfilled_on", TZ),
        Column("task_count", Integer, nullable=False),
        Column("data_product_status", String(20), nullable=False),
        Column("assets_revision", BigInteger, nullable=False),
        Column("dirty_from_revision", BigInteger),
        Column("next_eligible_run_at", TZ),
        Column("last_built_revision", BigInteger),
        _ref("current_processing_run_id"),
        Column("failed_runs", Integer, nullable=False),
        UniqueConstraint("observation_id", "request_id", "epoch_index", "sample_index",
                         "copy_index", name=f"uq_res_leaf_{g}"),
        Index(f"ix_res_request_{g}", "request_id"),
        Index(f"ix_res_fulfillment_{g}", "fulfillment_status"),
        Index(f"ix_res_product_{g}", "data_product_status"),
        Index(f"ix_res_next_run_{g}", "next_eligible_run_at"),
    )
    tasks = _read_model(
        name("observation_result_tasks"), md,
        _ref("result_id", required=True),
        Column("attempt", Integer, nullable=False),
        Column("instrument_id", String(100)),
        _ref("executed_obs_unit_id"),
        _status(),  # open | <task outcome>
        *_span("dispatched_at", "finished_at"),
        Index(f"ix_task_result_{g}", "result_id"),
        Index(f"ix_task_eou_{g}", "executed_obs_unit_id"),
    )
    runs = _read_model(
        name("processing_runs"), md,
        _ref("result_id", required=True),
        Column("revision", BigInteger, nullable=False),
        _status(),  # running | completed | failed | …
        *_span("started_at", "finished_at"),
        Column("outputs", Json, nullable=False),
        Column("error", Text),
        Index(f"ix_run_result_{g}", "result_id"),
    )
    jobs, job_files = build_download_tables(md, name, g)
    return ReadModelTables(md, units, files, packages, staging, results, tasks, runs, jobs,
                           job_files, *build_processing_tables(md, name, g), generation)


def build_download_tables(md: MetaData, name: Callable[[str], str], g: str,
                          ) -> tuple[Table, Table]:
    """MAST download jobs and their files (progress, speed, provenance of each file)."""
    jobs = _read_model(
        name("download_jobs"), md,
        _status(),
        Column("destination", String(1024), nullable=False),
        Column("mode", String(20), nullable=False),
        Column("chunk_size", BigInteger, nullable=False),
        Column("register_files", Boolean, nullable=False),
        Column("file_count", Integer, nullable=False),
        Column("files_completed", Integer, nullable=False),
        Column("bytes_total", BigInteger),  # known once every file's size is
        Column("bytes_done", BigInteger, nullable=False),
        Column("reason", Text),
        Column("partials_purged", Boolean, nullable=False),
        *_span("requested_at", "finished_at"),
        Index(f"ix_dlj_status_{g}", "status", "updated_at"),
    )
    job_files = _read_model(
        name("download_files"), md,  # id: uuid5(job id, index)
        _ref("job_id", required=True),
        Column("file_index", Integer, nullable=False),
        Column("filename", String(255), nullable=False),
        Column("url", Text, nullable=False),
        Column("data_uri", String(1024)),
        Column("obs_id", String(255)),
        Column("obsid", String(64)),
        Column("product_type", String(50)),
        Column("instrument", String(80)),
        _status(),
        Column("size", BigInteger),
        Column("bytes_done", BigInteger, nullable=False),
        Column("bytes_per_s", Float),
        Column("etag", String(1024)),
        Column("last_modified", String(100)),
        Column("sha256", String(64)),
        Column("fits", Json),
        Column("restarts", Integer, nullable=False),
        Column("started_at", TZ),
        Column("checkpoint_at", TZ),
        Column("completed_at", TZ),
        Index(f"ix_dlf_job_{g}", "job_id", "file_index"),
    )
    return jobs, job_files


def build_processing_tables(md: MetaData, name: Callable[[str], str], g: str,
                            ) -> tuple[Table, Table, Table, Table]:
    """Processing jobs (leases, steps, progress, outputs), the data products they built and
    the raw data files each product was built from (lineage)."""
    jobs = _read_model(
        name("processing_jobs"), md,
        Column("kind", String(20), nullable=False),
        _status(),
        *_algorithm(required=False),
        Column("inputs", Json, nullable=False),
        Column("product_ids", Json, nullable=False),
        Column("input_count", Integer, nullable=False),
        Column("input_bytes", BigInteger, nullable=False),
        *_result_run(),
        Column("catalog", Boolean, nullable=False),
        Column("publish", Boolean, nullable=False),
        Column("archive", Boolean, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("max_attempts", Integer, nullable=False),
        Column("lease_worker", String(200)),
        Column("lease_expires_at", TZ),
        Column("cancel_requested", Boolean, nullable=False),
        Column("progress", Float, nullable=False),
        Column("current_step", String(200)),
        Column("outputs", Json, nullable=False),
        Column("software", Json, nullable=False),
        Column("reason", Text),
        Column("requested_by", String(255), nullable=False),
        Column("completed_by", String(200)),  # the worker whose attempt succeeded
        Column("requested_at", TZ, nullable=False),
        Column("started_at", TZ),
        Column("finished_at", TZ),
        Index(f"ix_pj_status_{g}", "status", "requested_at"),
        Index(f"ix_pj_kind_{g}", "kind", "requested_at"),
        Index(f"ix_pj_lease_{g}", "status", "lease_expires_at"),
        Index(f"ix_pj_run_{g}", "run_id"),
    )
    steps = _read_model(
        name("processing_job_steps"), md,  # id: uuid5(job id, attempt and name)
        _ref("job_id", required=True),
        Column("attempt", Integer, nullable=False),
        Column("name", String(200), nullable=False),
        _status(),  # running | completed | interrupted
        *_span("started_at", "completed_at"),
        Column("duration_s", Float),
        Index(f"ix_pjs_job_{g}", "job_id", "created_position"),
    )
    products = _read_model(
        name("data_products"), md,
        _ref("job_id", required=True),
        Column("kind", String(50), nullable=False),
        Column("name", String(255), nullable=False),
        Column("area", String(30), nullable=False),
        Column("key", String(1024), nullable=False),
        Column("uri", String(2048)),
        Column("size", BigInteger, nullable=False),
        Column("sha256", String(64), nullable=False),
        Column("media_type", String(100), nullable=False),
        Column("metrics", Json, nullable=False),
        *_algorithm(required=True),
        Column("software", Json, nullable=False),
        *_result_run(),
        _status(),
        Column("published", Boolean, nullable=False),
        Column("archived", Boolean, nullable=False),
        Column("built_at", TZ, nullable=False),
        Column("catalogued_at", TZ),
        Column("metadata", Json, nullable=False),  # what catalog jobs recorded on it
        Index(f"ix_dp_status_{g}", "status", "built_at"),
        Index(f"ix_dp_job_{g}", "job_id"),
        Index(f"ix_dp_result_{g}", "result_id"),
    )
    inputs = _read_model(
        name("product_inputs"), md,  # id: uuid5(product id, file id)
        _ref("product_id", required=True),
        _ref("file_id", required=True),
        *_file_description(),
        Column("file_type", String(50), nullable=False),
        _ref("executed_obs_unit_id"),
        Column("role", String(30)),  # how the algorithm used it: bias, dark, flat, science
        Column("classified_from", String(255)),  # what said so: "IMAGETYP 'ZERO'", ...
        Index(f"ix_pi_product_{g}", "product_id"),
        Index(f"ix_pi_file_{g}", "file_id"),
    )
    return jobs, steps, products, inputs


def build_positions(md: MetaData | None = None) -> Table:
    """Where each projection stands in the event log (updated with the rows, atomically)."""
    return Table(
        "projection_positions", md or MetaData(),
        Column("name", String(100), primary_key=True),
        Column("position", BigInteger, nullable=False),
        Column("generation", String(40), nullable=False),
        Column("updated_at", TZ, nullable=False),
    )


def build_consumer_offsets(md: MetaData | None = None) -> Table:
    """Kafka projectors: the next offset to apply in each partition, per consumer group (updated
    with the rows, atomically), and which member applied it last."""
    return Table(
        "kafka_consumer_offsets", md or MetaData(),
        Column("group_id", String(200), primary_key=True),
        Column("topic", String(255), primary_key=True),
        Column("partition", Integer, primary_key=True),
        Column("next_offset", BigInteger, nullable=False),
        Column("member", String(255), nullable=False),
        Column("updated_at", TZ, nullable=False),
    )
