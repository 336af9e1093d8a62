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


def _common() -> list[Column[object]]:
    return [
        Column("created_position", BigInteger, nullable=False),
        Column("last_position", BigInteger, nullable=False),
        Column("last_command_id", String(255), nullable=False),
        Column("last_actor", String(255), nullable=False),
        Column("recorded_at", TZ, nullable=False),
        Column("updated_at", TZ, nullable=False),
    ]


def build_tables(generation: str = "", table_suffix: str = "") -> ReadModelTables:
    """Table objects named ``<model><table_suffix>``, indexes named after ``generation``."""
    md = MetaData()
    g = generation or "live"

    def name(base: str) -> str:
        return base + table_suffix

    units = Table(
        name("executed_obs_units"), md,
        Column("id", String(36), primary_key=True),
        Column("obs_unit_id", String(100), nullable=False),
        Column("instrument", String(100), nullable=False),
        Column("status", String(20), nullable=False),
        Column("start_time", TZ, nullable=False),
        Column("end_time", TZ),
        Column("metadata", Json, nullable=False),
        Column("finish_metadata", Json),
        Column("started_by", String(255), nullable=False),
        Column("finished_by", String(255)),
        *_common(),
        Index(f"ix_eou_obs_unit_{g}", "obs_unit_id"),
        Index(f"ix_eou_status_start_{g}", "status", "start_time"),
        Index(f"ix_eou_instrument_start_{g}", "instrument", "start_time"),
        Index(f"ix_eou_start_{g}", "start_time"),
    )
    files = Table(
        name("raw_data_files"), md,
        Column("id", String(36), primary_key=True),
        Column("name", String(255), nullable=False),
        Column("instrument", String(100), nullable=False),
        Column("relative_path", String(1024), nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("checksum_algorithm", String(20), nullable=False),
        Column("checksum_value", String(128), nullable=False),
        Column("executed_obs_unit_id", String(36)),
        Column("package_id", String(36)),
        Column("file_type", String(50), nullable=False),
        Column("created_at", TZ, nullable=False),
        *_common(),
        UniqueConstraint("instrument", "name", name=f"uq_rdf_instrument_name_{g}"),
        Index(f"ix_rdf_eou_{g}", "executed_obs_unit_id"),
        Index(f"ix_rdf_package_{g}", "package_id"),
        Index(f"ix_rdf_created_{g}", "created_at"),
    )
    packages = Table(
        name("raw_data_packages"), md,
        Column("id", String(36), primary_key=True),
        Column("name", String(255), nullable=False),
        Column("executed_obs_unit_id", String(36)),
        Column("status", String(20), nullable=False),
        Column("total_size", BigInteger, nullable=False),
        Column("file_count", Integer, nullable=False),
        Column("finalized_at", TZ),
        *_common(),
        Index(f"ix_rdp_eou_{g}", "executed_obs_unit_id"),
    )
    staging = Table(
        name("staging_requests"), md,
        Column("id", String(36), primary_key=True),
        Column("package_ids", Json, nullable=False),
        Column("destination", String(1024), nullable=False),
        Column("status", String(20), nullable=False),
        Column("bytes_total", BigInteger, nullable=False),
        Column("files_total", Integer, nullable=False),
        Column("bytes_transferred", BigInteger, nullable=False),
        Column("files_transferred", Integer, nullable=False),
        Column("message", Text),
        *_common(),
        Index(f"ix_stg_status_{g}", "status"),
    )
    results = Table(
        name("observation_results"), md,
        Column("id", String(36), primary_key=True),
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
        Column("current_processing_run_id", String(36)),
        Column("failed_runs", Integer, nullable=False),
        *_common(),
        UniqueConstraint("observation_id", "request_id", "epoch_index", "sample_index",
                         "copy_index", name=f"uq_res_leaf_{g}"),
        Index(f"ix_res_request_{g}", "request_id"),
        Index(f"ix_res_fulfillment_{g}", "fulfillment_status"),
        Index(f"ix_res_product_{g}", "data_product_status"),
        Index(f"ix_res_next_run_{g}", "next_eligible_run_at"),
    )
    tasks = Table(
        name("observation_result_tasks"), md,
        Column("id", String(36), primary_key=True),
        Column("result_id", String(36), nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("instrument_id", String(100)),
        Column("executed_obs_unit_id", String(36)),
        Column("status", String(20), nullable=False),  # open | <task outcome>
        Column("dispatched_at", TZ, nullable=False),
        Column("finished_at", TZ),
        *_common(),
        Index(f"ix_task_result_{g}", "result_id"),
        Index(f"ix_task_eou_{g}", "executed_obs_unit_id"),
    )
    runs = Table(
        name("processing_runs"), md,
        Column("id", String(36), primary_key=True),
        Column("result_id", String(36), nullable=False),
        Column("revision", BigInteger, nullable=False),
        Column("status", String(20), nullable=False),  # running | completed | failed | …
        Column("started_at", TZ, nullable=False),
        Column("finished_at", TZ),
        Column("outputs", Json, nullable=False),
        Column("error", Text),
        *_common(),
        Index(f"ix_run_result_{g}", "result_id"),
    )
    jobs, job_files = build_download_tables(md, name, g)
    return ReadModelTables(md, units, files, packages, staging, results, tasks, runs, jobs,
                           job_files, *build_processing_tables(md, name, g), generation)


def build_download_tables(md: MetaData, name: Callable[[str], str], g: str,
                          ) -> tuple[Table, Table]:
    """MAST download jobs and their files (progress, speed, provenance of each file)."""
    jobs = Table(
        name("download_jobs"), md,
        Column("id", String(36), primary_key=True),
        Column("status", String(20), nullable=False),
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
        Column("requested_at", TZ, nullable=False),
        Column("finished_at", TZ),
        *_common(),
        Index(f"ix_dlj_status_{g}", "status", "updated_at"),
    )
    job_files = Table(
        name("download_files"), md,
        Column("id", String(36), primary_key=True),  # uuid5(job id, index)
        Column("job_id", String(36), nullable=False),
        Column("file_index", Integer, nullable=False),
        Column("filename", String(255), nullable=False),
        Column("url", Text, nullable=False),
        Column("data_uri", String(1024)),
        Column("obs_id", String(255)),
        Column("obsid", String(64)),
        Column("product_type", String(50)),
        Column("instrument", String(80)),
        Column("status", String(20), nullable=False),
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
        *_common(),
        Index(f"ix_dlf_job_{g}", "job_id", "file_index"),
    )
    return jobs, job_files


def build_processing_tables(md: MetaData, name: Callable[[str], str], g: str,
                            ) -> tuple[Table, Table, Table, Table]:
    """Processing jobs (leases, steps, progress, outputs), the data products they built and
    the raw data files each product was built from (lineage)."""
    jobs = Table(
        name("processing_jobs"), md,
        Column("id", String(36), primary_key=True),
        Column("kind", String(20), nullable=False),
        Column("status", String(20), nullable=False),
        Column("algorithm", String(100)),
        Column("algorithm_version", String(50)),
        Column("parameters", Json, nullable=False),
        Column("inputs", Json, nullable=False),
        Column("product_ids", Json, nullable=False),
        Column("input_count", Integer, nullable=False),
        Column("input_bytes", BigInteger, nullable=False),
        Column("result_id", String(36)),
        Column("run_id", String(36)),
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
        *_common(),
        Index(f"ix_pj_status_{g}", "status", "requested_at"),
        Index(f"ix_pj_kind_{g}", "kind", "requested_at"),
        Index(f"ix_pj_lease_{g}", "status", "lease_expires_at"),
        Index(f"ix_pj_run_{g}", "run_id"),
    )
    steps = Table(
        name("processing_job_steps"), md,
        Column("id", String(36), primary_key=True),  # uuid5(job id, attempt and name)
        Column("job_id", String(36), nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("name", String(200), nullable=False),
        Column("status", String(20), nullable=False),  # running | completed | interrupted
        Column("started_at", TZ, nullable=False),
        Column("completed_at", TZ),
        Column("duration_s", Float),
        *_common(),
        Index(f"ix_pjs_job_{g}", "job_id", "created_position"),
    )
    products = Table(
        name("data_products"), md,
        Column("id", String(36), primary_key=True),
        Column("job_id", String(36), nullable=False),
        Column("kind", String(50), nullable=False),
        Column("name", String(255), nullable=False),
        Column("area", String(30), nullable=False),
        Column("key", String(1024), nullable=False),
        Column("uri", String(2048)),
        Column("size", BigInteger, nullable=False),
        Column("sha256", String(64), nullable=False),
        Column("media_type", String(100), nullable=False),
        Column("metrics", Json, nullable=False),
        Column("algorithm", String(100), nullable=False),
        Column("algorithm_version", String(50), nullable=False),
        Column("parameters", Json, nullable=False),
        Column("software", Json, nullable=False),
        Column("result_id", String(36)),
        Column("run_id", String(36)),
        Column("status", String(20), nullable=False),
        Column("published", Boolean, nullable=False),
        Column("archived", Boolean, nullable=False),
        Column("built_at", TZ, nullable=False),
        Column("catalogued_at", TZ),
        Column("metadata", Json, nullable=False),  # what catalog jobs recorded on it
        *_common(),
        Index(f"ix_dp_status_{g}", "status", "built_at"),
        Index(f"ix_dp_job_{g}", "job_id"),
        Index(f"ix_dp_result_{g}", "result_id"),
    )
    inputs = Table(
        name("product_inputs"), md,
        Column("id", String(36), primary_key=True),  # uuid5(product id, file id)
        Column("product_id", String(36), nullable=False),
        Column("file_id", String(36), nullable=False),
        Column("name", String(255), nullable=False),
        Column("instrument", String(100), nullable=False),
        Column("relative_path", String(1024), nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("checksum_algorithm", String(20), nullable=False),
        Column("checksum_value", String(128), nullable=False),
        Column("file_type", String(50), nullable=False),
        Column("executed_obs_unit_id", String(36)),
        Column("role", String(30)),  # how the algorithm used it: bias, dark, flat, science
        Column("classified_from", String(255)),  # what said so: "IMAGETYP 'ZERO'", ...
        *_common(),
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
