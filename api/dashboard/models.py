"""The shape of ``GET /dashboard/summary`` (``queries.night.NightQueries.summary``): each
section's counts (null while the read models do not answer) and rows, the rows in the same
views as the lists they come from."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from api.mast import DownloadJobView
from api.ops import JobView
from queries.models import ExecutedObsUnitView, RawDataPackageView, StagingRequestView

ByStatus = dict[str, int] | None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExecutionsSection(Section):
    by_status: ByStatus = Field(description="Executed obs units by status (null: the read "
                                "models do not answer).")
    items: list[ExecutedObsUnitView] = Field(description="Executions started in the last 12 "
                                             "hours, pending ones included.")


class FilesMinute(Section):
    minute: str = Field(description="The minute (ISO 8601, UTC).")
    files: int


class FilesSection(Section):
    total: int | None = Field(description="Raw data files in the read models.")
    per_minute: list[FilesMinute] | None = Field(description="Files registered per minute "
                                                 "over the last hour (minutes without "
                                                 "files left out).")
    since: datetime
    pending_commands: int


class PackagesSection(Section):
    by_status: ByStatus
    bytes_by_status: ByStatus
    items: list[RawDataPackageView] = Field(description="The newest packages, pending first.")


class StagingSection(Section):
    by_status: ByStatus
    queue: list[StagingRequestView] = Field(description="Staging requests pending or in "
                                            "progress, oldest first, pending commands first.")


class DownloadsSection(Section):
    items: list[DownloadJobView] = Field(description="The newest MAST download jobs.")


class ProcessingJobsSection(Section):
    by_status: ByStatus
    items: list[JobView] = Field(description="The newest processing jobs.")


class ResultsSection(Section):
    fulfillment_status: ByStatus
    data_product_status: ByStatus
    pending_commands: int


class NightSummary(Section):
    """Tonight at a glance."""

    at: datetime
    read_model_position: int | None = Field(description="Where the page starts following "
                                            "GET /stream (`after`).")
    executions: ExecutionsSection
    files: FilesSection
    packages: PackagesSection
    staging: StagingSection
    downloads: DownloadsSection
    processing_jobs: ProcessingJobsSection
    observation_results: ResultsSection
    read_models: Literal["available", "unavailable"]
