"""Raw data files written by instruments, and the raw data packages that group them."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, cast
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event
from eventsourcing.utils import get_topic

from domain.errors import IllegalTransition, InvalidCommand, LimitExceeded
from domain.provenance import Provenance, utc, with_provenance

#: Namespace of raw data file ids: a file's id is derived from (instrument, name), so the
#: event store's primary key enforces "name unique per instrument" and clients can compute it.
RAW_DATA_FILE_NAMESPACE = UUID("6f1c5e0e-8a55-4b8e-9a59-3f3c1b0a7d21")

#: Default limit of a raw data package's total size: 50 GB.
DEFAULT_PACKAGE_SIZE_LIMIT = 50 * 10**9


def raw_data_file_id(instrument: str, name: str) -> UUID:
    """The id of the raw data file called ``name`` written by ``instrument``."""
    return uuid5(RAW_DATA_FILE_NAMESPACE, f"{instrument}\x00{name}")


class RawDataFile(Aggregate):
    """One file an instrument wrote; registered once, later grouped into one package."""

    #: The creation event class, made by ``@event("Registered")`` below from ``__init__``'s
    #: parameters (declared here for type checkers, which cannot see its fields)
    Registered: ClassVar[Any]

    @event("Registered")
    @with_provenance
    def __init__(
        self,
        id: UUID,
        name: str,
        instrument: str,
        relative_path: str,
        size: int,
        checksum_algorithm: str,
        checksum_value: str,
        executed_obs_unit_id: UUID | None,
        file_type: str,
        created_at: datetime,
        package_id: UUID | None,
        **provenance: Any,
    ) -> None:
        self.name = name
        self.instrument = instrument
        self.relative_path = relative_path
        self.size = size
        self.checksum_algorithm = checksum_algorithm
        self.checksum_value = checksum_value
        self.executed_obs_unit_id = executed_obs_unit_id
        self.file_type = file_type
        self.created_at = created_at
        self.package_id = package_id
        self.fits_metadata: dict[str, Any] = {}  # header facts an ingest job recorded

    @classmethod
    def register(cls, **fields: Any) -> RawDataFile:
        """A new file (its ``Registered`` event pending); the arguments of ``registration``."""
        registered = cls.registration(**fields)
        f = cast(RawDataFile, registered.mutate(None))
        f.pending_events.append(registered)
        return f

    @classmethod
    def registration(
        cls,
        *,
        name: str,
        instrument: str,
        relative_path: str,
        size: int,
        checksum_algorithm: str,
        checksum_value: str,
        executed_obs_unit_id: UUID | None,
        file_type: str,
        created_at: datetime,
        package_id: UUID | None,
        provenance: Provenance,
    ) -> Aggregate.Created:
        """The event that registers a file (the file is ``event.mutate(None)``).

        Registration hands out the event, not the aggregate: a bulk registration creates
        thousands of files that nothing in the same command reads again, and building each
        aggregate (which eventsourcing does by applying the event it just made) was half the
        cost of registering one (tests/unit/test_domain.py checks both give the same event).
        """
        if size < 0:
            raise InvalidCommand(f"size of {name} must be >= 0", field="size")
        return cls.Registered(
            originator_topic=_RAW_DATA_FILE_TOPIC,
            originator_id=raw_data_file_id(instrument, name),
            originator_version=cls.INITIAL_VERSION,
            timestamp=cls.Registered.create_timestamp(),
            name=name,
            instrument=instrument,
            relative_path=relative_path,
            size=size,
            checksum_algorithm=checksum_algorithm,
            checksum_value=checksum_value,
            executed_obs_unit_id=executed_obs_unit_id,
            file_type=file_type,
            created_at=utc(created_at),
            package_id=package_id,
            **provenance.event_fields(),
        )

    def assign_to_package(self, package_id: UUID, provenance: Provenance) -> None:
        if self.package_id == package_id:
            return
        if self.package_id is not None:
            raise IllegalTransition(
                f"raw data file {self.name} ({self.id}) already belongs to package "
                f"{self.package_id}",
                field="file_ids",
            )
        self._assigned_to_package(package_id=package_id, **provenance.event_fields())

    @event("AssignedToPackage")
    @with_provenance
    def _assigned_to_package(
        self,
        package_id: UUID,
        **provenance: Any,
    ) -> None:
        self.package_id = package_id


    def record_ingest(self, job_id: UUID, metadata: dict[str, Any],
                      provenance: Provenance) -> None:
        """An ingest job validated the file and extracted its FITS header facts."""
        self._ingested(job_id=job_id, metadata=metadata, **provenance.event_fields())

    @event("Ingested")
    @with_provenance
    def _ingested(
        self,
        job_id: UUID,
        metadata: dict[str, Any],
        **provenance: Any,
    ) -> None:
        self.fits_metadata = metadata


class PackageStatus(StrEnum):
    BUILDING = "building"
    COMPLETE = "complete"


_RAW_DATA_FILE_TOPIC = get_topic(RawDataFile)


class RawDataPackage(Aggregate):
    """Files of one observation grouped for transfer; ``building`` until finalized."""

    @event("Created")
    @with_provenance
    def __init__(
        self,
        id: UUID,
        name: str,
        executed_obs_unit_id: UUID | None,
        file_ids: list[UUID],
        total_size: int,
        **provenance: Any,
    ) -> None:
        self.name = name
        self.executed_obs_unit_id = executed_obs_unit_id
        self.file_ids = list(file_ids)
        self.total_size = total_size
        self.status = PackageStatus.BUILDING.value

    @classmethod
    def create(
        cls,
        *,
        package_id: UUID,
        name: str,
        executed_obs_unit_id: UUID | None,
        files: Iterable[RawDataFile],
        size_limit: int,
        provenance: Provenance,
    ) -> RawDataPackage:
        files = list(files)
        cls._check_files(package_id, executed_obs_unit_id, files)
        total = sum(f.size for f in files)
        cls._check_limit(package_id, total, size_limit)
        package = cls(
            id=package_id,
            name=name,
            executed_obs_unit_id=executed_obs_unit_id,
            file_ids=[f.id for f in files],
            total_size=total,
            **provenance.event_fields(),
        )
        for f in files:
            f.assign_to_package(package_id, provenance)
        return package

    def add_files(
        self, files: Iterable[RawDataFile], size_limit: int, provenance: Provenance
    ) -> None:
        self._require_building("add files to")
        present = set(self.file_ids)
        # each file once, even when the command names it twice
        new = list({f.id: f for f in files if f.id not in present}.values())
        self._check_files(self.id, self.executed_obs_unit_id, new)
        added = sum(f.size for f in new)
        self._check_limit(self.id, self.total_size + added, size_limit)
        if not new:
            return
        self._files_added(
            file_ids=[f.id for f in new], added_size=added, **provenance.event_fields()
        )
        for f in new:
            f.assign_to_package(self.id, provenance)

    @event("FilesAdded")
    @with_provenance
    def _files_added(
        self,
        file_ids: list[UUID],
        added_size: int,
        **provenance: Any,
    ) -> None:
        self.file_ids.extend(file_ids)
        self.total_size += added_size

    def finalize(self, size_limit: int, provenance: Provenance) -> None:
        self._require_building("finalize")
        self._check_limit(self.id, self.total_size, size_limit)
        if not self.file_ids:
            raise InvalidCommand(f"raw data package {self.id} has no files", field="file_ids")
        self._finalized(
            total_size=self.total_size, file_count=len(self.file_ids),
            **provenance.event_fields(),
        )

    @event("Finalized")
    @with_provenance
    def _finalized(
        self,
        total_size: int,
        file_count: int,
        **provenance: Any,
    ) -> None:
        self.status = PackageStatus.COMPLETE.value

    @property
    def finalized_at(self) -> datetime | None:
        # A complete package is frozen: its last event is Finalized, whose timestamp is
        # ``modified_on`` (set only after an event's apply, so apply cannot record it).
        return self.modified_on if self.status == PackageStatus.COMPLETE.value else None

    def _require_building(self, verb: str) -> None:
        if self.status != PackageStatus.BUILDING.value:
            raise IllegalTransition(
                f"raw data package {self.id} is {self.status}; cannot {verb} it"
            )

    @staticmethod
    def _check_files(
        package_id: UUID, executed_obs_unit_id: UUID | None, files: list[RawDataFile]
    ) -> None:
        for f in files:
            if f.package_id is not None and f.package_id != package_id:
                raise IllegalTransition(
                    f"raw data file {f.name} ({f.id}) already belongs to package "
                    f"{f.package_id}",
                    field="file_ids",
                )
            if (
                executed_obs_unit_id is not None
                and f.executed_obs_unit_id is not None
                and f.executed_obs_unit_id != executed_obs_unit_id
            ):
                raise InvalidCommand(
                    f"raw data file {f.name} belongs to executed obs unit "
                    f"{f.executed_obs_unit_id}, not {executed_obs_unit_id}",
                    field="file_ids",
                )

    @staticmethod
    def _check_limit(package_id: UUID, total: int, size_limit: int) -> None:
        if total > size_limit:
            raise LimitExceeded(
                f"raw data package {package_id} would hold {total} bytes, over the limit of "
                f"{size_limit} bytes",
                field="total_size",
            )
