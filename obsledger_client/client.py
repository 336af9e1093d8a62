""":class:`ObsLedgerClient`: the obsledger HTTP API for telescope scripts — one method per
command and query, an idempotency key per logical command reused on every retry, retries with
backoff (stamina) for what may pass (no answer, 502/503/504, honouring ``Retry-After``),
``wait=`` for commands and ``min_position=`` for queries (read your writes), and the
service's refusals raised as :class:`~obsledger_client.errors.ObsLedgerError`."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import PurePath
from typing import Any
from uuid import UUID

import httpx
import stamina

from obsledger_client.errors import ObsLedgerError, ServiceUnreachable, error_from

#: Answers worth another try: a proxy or the service not answering (yet).
RETRIED_STATUSES = frozenset({502, 503, 504})

Id = str | UUID
Time = datetime | str
Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a command was answered: ``accepted`` (journaled, applied shortly) or, with
    ``wait=True``, ``applied`` at ``position`` (pass it as ``min_position`` to a query).
    ``ids`` are the pre-generated ids of what it creates; ``replayed`` says a retry got the
    first answer."""

    command_id: str
    status: str
    ids: Json
    position: int | None = None
    replayed: bool = False
    count: int | None = None
    body: Json = field(default_factory=dict, repr=False)

    @property
    def applied(self) -> bool:
        return self.status == "applied"

    def id(self, name: str) -> str:
        """One of ``ids`` (``executed_obs_unit_id``, ``raw_data_package_id``…)."""
        return str(self.ids[name])


class _RetryableAnswer(Exception):
    """An answer worth another try (RETRIED_STATUSES), kept to raise if none is left."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"{response.status_code} from {response.request.url}")
        self.response = response
        self.retry_after = _retry_after(response)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


def _backoff(exc: Exception) -> bool | float:
    """stamina's hook: retry what may pass, after the service's Retry-After when it said."""
    if isinstance(exc, _RetryableAnswer):
        return True if exc.retry_after is None else min(exc.retry_after, 30.0)
    return isinstance(exc, httpx.TransportError)


def _plain(value: Any) -> Any:
    """JSON for what scripts hold: datetimes (ISO 8601), UUIDs, paths, nested containers."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, UUID | PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _body(**fields: Any) -> Json:
    """A request body without the fields left out (None)."""
    return {k: _plain(v) for k, v in fields.items() if v is not None}


class ObsLedgerClient:
    """The obsledger API for a script.

    ``ObsLedgerClient(url, token=…)`` with a service account's API token (``obsledger
    service-token NAME --role automation``), or ``username=``/``password=`` for a user (the
    30-minute token is renewed when it expires). ``attempts`` and ``retry_timeout`` bound the
    retries of one call; a command keeps its idempotency key through them, so it is applied
    once however often it is sent.
    """

    def __init__(self, base_url: str, token: str | None = None, *,
                 username: str | None = None, password: str | None = None,
                 timeout: float = 30.0, attempts: int = 6, retry_timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        if token is None and (username is None or password is None):
            raise ValueError("give a token, or a username and password")
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                  transport=transport,
                                  headers={"User-Agent": "obsledger-client"})
        self._token = token
        self._credentials = (username, password) if token is None else None
        self.attempts = attempts
        self.retry_timeout = retry_timeout
        #: The highest log position this client saw applied (``wait=True`` commands).
        self.last_position = 0

    # -- plumbing --------------------------------------------------------------------------
    def __enter__(self) -> ObsLedgerClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def login(self) -> None:
        """Get a user token with the username and password given (``POST /auth/token``)."""
        if self._credentials is None:
            raise ValueError("this client was given a token, not a username and password")
        username, password = self._credentials
        answer = self._send("POST", "/auth/token", data={"username": username,
                                                          "password": password},
                            authenticate=False)
        self._token = str(answer.json()["access_token"])

    def _send(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
              json_body: Any = None, data: Mapping[str, Any] | None = None,
              headers: Mapping[str, str] | None = None, authenticate: bool = True,
              ) -> httpx.Response:
        """One request, retried (same headers, same idempotency key) while it may pass;
        an error answer raised as an :class:`ObsLedgerError`."""
        if authenticate and self._token is None:
            self.login()
        content = None if json_body is None else json.dumps(json_body).encode()
        query = {k: _plain(v) for k, v in (params or {}).items() if v is not None}
        renewed = False
        while True:
            sent = {**(headers or {})}
            if content is not None:
                sent["Content-Type"] = "application/json"
            if authenticate:
                sent["Authorization"] = f"Bearer {self._token}"
            try:
                response = self._retrying(method, path, query, content, data, sent)
            except httpx.TransportError as e:
                raise ServiceUnreachable(0, f"{method} {path}: {type(e).__name__}: {e}") from e
            except _RetryableAnswer as e:
                response = e.response
            if response.status_code == 401 and authenticate and self._credentials \
                    and not renewed:  # the user token expired: log in again, once
                renewed = True
                self.login()
                continue
            if response.status_code >= 400:
                try:
                    body: Any = response.json()
                except ValueError:
                    body = response.text
                raise error_from(response.status_code, body, _retry_after(response))
            return response

    def _retrying(self, method: str, path: str, query: Mapping[str, Any],
                  content: bytes | None, data: Mapping[str, Any] | None,
                  headers: Mapping[str, str]) -> httpx.Response:
        for attempt in stamina.retry_context(on=_backoff, attempts=self.attempts,
                                             timeout=self.retry_timeout, wait_initial=0.2,
                                             wait_max=5.0):
            with attempt:
                response = self._http.request(method, path, params=query, content=content,
                                              data=data, headers=headers)
                if response.status_code in RETRIED_STATUSES:
                    raise _RetryableAnswer(response)
                return response
        raise AssertionError("unreachable")  # stamina raises the last error itself

    def command(self, method: str, path: str, body: Any = None, *,
                idempotency_key: str | None = None, correlation_id: str | None = None,
                wait: bool = False, params: Mapping[str, Any] | None = None) -> CommandResult:
        """Send one logical command: its idempotency key (generated unless given) is the
        same on every retry. With ``wait``, the answer says it was applied (``position``),
        or — applied later than ``OBSLEDGER_SYNC_WAIT_S`` — still ``accepted``; a rejected
        command raises with its ``command_id``."""
        key = idempotency_key or str(uuid.uuid4())
        headers = {"Idempotency-Key": key}
        if correlation_id is not None:
            headers["X-Correlation-ID"] = correlation_id
        response = self._send(method, path, params={**(params or {}),
                                                    "wait": "true" if wait else None},
                              json_body=body, headers=headers)
        answer = response.json()
        if answer.get("position") is not None:
            self.last_position = max(self.last_position, int(answer["position"]))
        return CommandResult(command_id=str(answer["command_id"]), status=str(answer["status"]),
                             ids=dict(answer.get("ids") or {}), position=answer.get("position"),
                             replayed=response.headers.get("Idempotent-Replayed") == "true",
                             count=answer.get("count"), body=answer)

    def query(self, path: str, params: Mapping[str, Any] | None = None,
              min_position: int | None = None) -> Any:
        """One query's JSON; ``min_position`` waits (bounded) until the read models include
        that log position."""
        return self._send("GET", path, params={**(params or {}),
                                               "min_position": min_position}).json()

    # -- command status --------------------------------------------------------------------
    def command_status(self, command_id: str) -> Json:
        """Where a command stands: accepted, applied (position) or rejected (reason)."""
        return dict(self.query(f"/commands/{command_id}"))

    def wait_for_command(self, command_id: str, timeout: float = 60.0,
                         poll_s: float = 0.2) -> Json:
        """Until the command is applied (its status) or rejected (raised as
        :class:`ObsLedgerError` with the reason); TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.command_status(command_id)
            if status["status"] == "applied":
                self.last_position = max(self.last_position, int(status["position"]))
                return status
            if status["status"] == "rejected":
                raise error_from(422 if status.get("reason_code") == "invalid" else 409, {
                    "detail": status.get("reason"), "command_id": command_id,
                    "errors": [{"field": status.get("reason_field") or "",
                                "message": status.get("reason") or ""}]}, None)
            if time.monotonic() > deadline:
                raise TimeoutError(f"command {command_id} is still {status['status']}")
            time.sleep(poll_s)

    def health(self) -> Json:
        return dict(self._send("GET", "/health", authenticate=False).json())

    # -- executed obs units ----------------------------------------------------------------
    def start_execution(self, obs_unit_id: str, instrument: str, *,
                        start_time: Time | None = None, metadata: Json | None = None,
                        execution_id: Id | None = None, idempotency_key: str | None = None,
                        correlation_id: str | None = None, wait: bool = False,
                        ) -> CommandResult:
        """Start an execution of a planned obs unit (``ids["executed_obs_unit_id"]``)."""
        return self.command("POST", "/executed_obs_units/start", _body(
            id=execution_id, obs_unit_id=obs_unit_id, instrument=instrument,
            start_time=start_time, metadata=metadata), idempotency_key=idempotency_key,
            correlation_id=correlation_id, wait=wait)

    def finish_execution(self, execution_id: Id, status: str, *, end_time: Time | None = None,
                         metadata: Json | None = None, idempotency_key: str | None = None,
                         correlation_id: str | None = None, wait: bool = False,
                         ) -> CommandResult:
        """Finish it: ``success``, ``failed`` or ``aborted``."""
        return self.command("PUT", f"/executed_obs_units/{execution_id}/finish", _body(
            status=status, end_time=end_time, metadata=metadata),
            idempotency_key=idempotency_key, correlation_id=correlation_id, wait=wait)

    def executions(self, *, status: str | None = None, instrument: str | None = None,
                   obs_unit_id: str | None = None, start_from: Time | None = None,
                   start_to: Time | None = None, limit: int | None = None,
                   offset: int | None = None, min_position: int | None = None) -> Json:
        """Executed obs units, newest first (a page: ``items``, ``total``…)."""
        return dict(self.query("/executed_obs_units", _body(
            status=status, instrument=instrument, obs_unit_id=obs_unit_id,
            start_from=start_from, start_to=start_to, limit=limit, offset=offset),
            min_position))

    def executions_of(self, obs_unit_id: str, *, min_position: int | None = None) -> Json:
        """Every execution of a planned obs unit, pending ones included."""
        return dict(self.query(f"/executed_obs_units/{obs_unit_id}", None, min_position))

    def execution(self, execution_id: Id, *, min_position: int | None = None) -> Json:
        return dict(self.query(f"/executed_obs_units/execution/{execution_id}", None,
                               min_position))

    # -- raw data files --------------------------------------------------------------------
    def register_file(self, name: str, relative_path: str, size: int, checksum: Json,
                      instrument: str, file_type: str, *,
                      executed_obs_unit_id: Id | None = None, created_at: Time | None = None,
                      idempotency_key: str | None = None, correlation_id: str | None = None,
                      wait: bool = False) -> CommandResult:
        """Register one raw data file (``checksum``: ``{"algorithm": "sha256", "value":
        …}``); its id is uuid5(instrument, name)."""
        return self.command("POST", "/raw_data_files", _body(
            name=name, relative_path=relative_path, size=size, checksum=checksum,
            instrument=instrument, file_type=file_type,
            executed_obs_unit_id=executed_obs_unit_id, created_at=created_at),
            idempotency_key=idempotency_key, correlation_id=correlation_id, wait=wait)

    def register_files(self, files: Sequence[Mapping[str, Any]], *,
                       idempotency_key: str | None = None, correlation_id: str | None = None,
                       wait: bool = False) -> CommandResult:
        """Register many files in one command, all or none (``count`` in the answer)."""
        return self.command("POST", "/raw_data_files/bulk", {"files": _plain(list(files))},
                            idempotency_key=idempotency_key, correlation_id=correlation_id,
                            wait=wait)

    def files(self, *, executed_obs_unit_id: Id | None = None, package_id: Id | None = None,
              instrument: str | None = None, file_type: str | None = None,
              name: str | None = None, limit: int | None = None, offset: int | None = None,
              min_position: int | None = None) -> Json:
        return dict(self.query("/raw_data_files", _body(
            executed_obs_unit_id=executed_obs_unit_id, package_id=package_id,
            instrument=instrument, file_type=file_type, name=name, limit=limit,
            offset=offset), min_position))

    def file(self, file_id: Id, *, min_position: int | None = None) -> Json:
        return dict(self.query(f"/raw_data_files/{file_id}", None, min_position))

    # -- raw data packages -----------------------------------------------------------------
    def create_package(self, name: str, *, executed_obs_unit_id: Id | None = None,
                       file_ids: Sequence[Id] = (), files: Sequence[Mapping[str, Any]] = (),
                       package_id: Id | None = None, idempotency_key: str | None = None,
                       correlation_id: str | None = None, wait: bool = False,
                       ) -> CommandResult:
        """Create a raw data package of registered files (``file_ids``) and/or files it
        registers itself (``files``)."""
        return self.command("POST", "/raw_data_package", _body(
            id=package_id, name=name, executed_obs_unit_id=executed_obs_unit_id,
            file_ids=list(file_ids), files=list(files)), idempotency_key=idempotency_key,
            correlation_id=correlation_id, wait=wait)

    def add_files_to_package(self, package_id: Id, file_ids: Sequence[Id], *,
                             idempotency_key: str | None = None,
                             correlation_id: str | None = None, wait: bool = False,
                             ) -> CommandResult:
        return self.command("POST", f"/raw_data_package/{package_id}/files",
                            _body(file_ids=list(file_ids)), idempotency_key=idempotency_key,
                            correlation_id=correlation_id, wait=wait)

    def finalize_package(self, package_id: Id, *, idempotency_key: str | None = None,
                         correlation_id: str | None = None, wait: bool = False,
                         ) -> CommandResult:
        """building → complete."""
        return self.command("PUT", f"/raw_data_package/{package_id}/finalize", None,
                            idempotency_key=idempotency_key, correlation_id=correlation_id,
                            wait=wait)

    def package(self, package_id: Id, *, min_position: int | None = None) -> Json:
        """A package with its files."""
        return dict(self.query(f"/raw_data_package/{package_id}", None, min_position))

    # -- staging ---------------------------------------------------------------------------
    def stage(self, package_ids: Sequence[Id], destination: str, *,
              staging_id: Id | None = None, idempotency_key: str | None = None,
              correlation_id: str | None = None, wait: bool = False) -> CommandResult:
        """Stage complete packages for transfer (``ids["staging_id"]``)."""
        return self.command("POST", "/staging/stage", _body(
            id=staging_id, package_ids=list(package_ids), destination=destination),
            idempotency_key=idempotency_key, correlation_id=correlation_id, wait=wait)

    def report_staging_progress(self, staging_id: Id, bytes_transferred: int,
                                files_transferred: int, *, status: str | None = None,
                                message: str | None = None, idempotency_key: str | None = None,
                                correlation_id: str | None = None, wait: bool = False,
                                ) -> CommandResult:
        """The transfer agent's progress: in_progress, completed or failed."""
        return self.command("PUT", f"/staging/{staging_id}/progress", _body(
            status=status, bytes_transferred=bytes_transferred,
            files_transferred=files_transferred, message=message),
            idempotency_key=idempotency_key, correlation_id=correlation_id, wait=wait)

    def cancel_staging(self, staging_id: Id, *, reason: str | None = None,
                       idempotency_key: str | None = None, correlation_id: str | None = None,
                       wait: bool = False) -> CommandResult:
        return self.command("DELETE", f"/staging/{staging_id}", None,
                            params={"reason": reason}, idempotency_key=idempotency_key,
                            correlation_id=correlation_id, wait=wait)

    def staging_status(self, staging_id: Id, *, min_position: int | None = None) -> Json:
        return dict(self.query(f"/staging/status/{staging_id}", None, min_position))

    # -- observation results ---------------------------------------------------------------
    def materialize_results(self, observation_id: int, request_id: int, **spec: Any,
                            ) -> CommandResult:
        """A request spec's leaf cells (``epochs``, ``samples``, ``copies_mode``…; and the
        command options ``idempotency_key``, ``correlation_id``, ``wait``)."""
        options, spec = _options(spec)
        return self.command("POST", "/observation_results/materialize", _body(
            observation_id=observation_id, request_id=request_id, **spec), **options)

    def dispatch_result(self, result_id: Id, **fields: Any) -> CommandResult:
        """``task_id``, ``instrument_id``, ``executed_obs_unit_id`` (all optional)."""
        options, fields = _options(fields)
        return self.command("POST", f"/observation_results/{result_id}/dispatch",
                            _body(**fields), **options)

    def report_task_outcome(self, result_id: Id, task_id: Id, outcome: str,
                            **fields: Any) -> CommandResult:
        """A task's outcome (``finished_at``, ``executed_obs_unit_id`` optional)."""
        options, fields = _options(fields)
        return self.command("PUT", f"/observation_results/{result_id}/tasks/{task_id}",
                            _body(outcome=outcome, **fields), **options)

    def cancel_result(self, result_id: Id, reason: str, **options: Any) -> CommandResult:
        return self.command("POST", f"/observation_results/{result_id}/cancel",
                            _body(reason=reason), **options)

    def contribute_asset(self, result_id: Id, asset_id: str, **options: Any) -> CommandResult:
        return self.command("POST", f"/observation_results/{result_id}/assets",
                            _body(asset_id=asset_id), **options)

    def start_processing_run(self, result_id: Id, *, run_id: Id | None = None,
                             **options: Any) -> CommandResult:
        return self.command("POST", f"/observation_results/{result_id}/runs",
                            _body(run_id=run_id), **options)

    def end_processing_run(self, result_id: Id, run_id: Id, end: str, **fields: Any,
                           ) -> CommandResult:
        """``end``: the run's outcome; ``outputs``, ``error`` optional."""
        options, fields = _options(fields)
        return self.command("PUT", f"/observation_results/{result_id}/runs/{run_id}",
                            _body(end=end, **fields), **options)

    def observation_result(self, result_id: Id, *, min_position: int | None = None) -> Json:
        return dict(self.query(f"/observation_results/{result_id}", None, min_position))

    def observation_results(self, *, min_position: int | None = None, **filters: Any) -> Json:
        """Filters: observation_id, request_id, instrument_id, fulfillment_status,
        data_product_status, dirty, limit, offset."""
        return dict(self.query("/observation_results", _body(**filters), min_position))

    def results_due(self, limit: int | None = None) -> Any:
        return self.query("/observation_results/due", _body(limit=limit))

    def result_counts(self) -> Json:
        return dict(self.query("/observation_results/counts"))

    # -- MAST downloads --------------------------------------------------------------------
    def start_download(self, *, products: Sequence[Mapping[str, Any]] | None = None,
                       obs_id: str | None = None, filters: Json | None = None,
                       destination: str | None = None, chunked: bool = False,
                       chunk_size: int | None = None, register_files: bool | None = None,
                       **options: Any) -> CommandResult:
        """A download job of MAST products (``[{"data_uri": "mast:…"}]``) or an
        observation's (``obs_id`` with ``filters``)."""
        path = "/mast/download/start-chunked" if chunked else "/mast/download/start"
        return self.command("POST", path, _body(
            products=None if products is None else list(products), obs_id=obs_id,
            filters=filters, destination=destination, chunk_size=chunk_size,
            register_files=register_files), **options)

    def pause_download(self, job_id: Id, **options: Any) -> CommandResult:
        return self.command("POST", f"/mast/download/pause/{job_id}", None, **options)

    def resume_download(self, job_id: Id, **options: Any) -> CommandResult:
        return self.command("POST", f"/mast/download/resume/{job_id}", None, **options)

    def cancel_download(self, job_id: Id, *, reason: str | None = None,
                        **options: Any) -> CommandResult:
        return self.command("DELETE", f"/mast/download/{job_id}", None,
                            params={"reason": reason}, **options)

    def download_progress(self, job_id: Id, *, min_position: int | None = None) -> Json:
        return dict(self.query(f"/mast/download/progress/{job_id}", None, min_position))

    def download_jobs(self, *, status: str | None = None, limit: int | None = None,
                      offset: int | None = None) -> Json:
        return dict(self.query("/mast/download/jobs", _body(status=status, limit=limit,
                                                            offset=offset)))

    def resumable_downloads(self, *, limit: int | None = None,
                            offset: int | None = None) -> Json:
        return dict(self.query("/mast/download/resumable", _body(limit=limit, offset=offset)))

    # -- processing ------------------------------------------------------------------------
    def algorithms(self) -> list[Json]:
        return list(self.query("/ops/algorithms"))

    def plan(self, *, file_ids: Sequence[Id] = (), result_ids: Sequence[Id] = (),
             start_time: Time | None = None, end_time: Time | None = None,
             algorithm: str | None = None, algorithm_version: str | None = None,
             parameters: Json | None = None) -> Json:
        """What a process job would do (records nothing): steps, inputs, products."""
        return dict(self._send("POST", "/ops/plan", json_body=_body(
            file_ids=list(file_ids) or None, result_ids=list(result_ids) or None,
            start_time=start_time, end_time=end_time, algorithm=algorithm,
            algorithm_version=algorithm_version, parameters=parameters)).json())

    def ingest(self, *, file_ids: Sequence[Id] = (), result_ids: Sequence[Id] = (),
               job_id: Id | None = None, **options: Any) -> CommandResult:
        """An ingest job (``ids["processing_job_id"]``)."""
        return self.command("POST", "/ops/ingest", _body(
            id=job_id, file_ids=list(file_ids) or None,
            result_ids=list(result_ids) or None), **options)

    def process(self, *, file_ids: Sequence[Id] = (), result_ids: Sequence[Id] = (),
                algorithm: str | None = None, algorithm_version: str | None = None,
                parameters: Json | None = None, catalog: bool | None = None,
                publish: bool | None = None, archive: bool | None = None,
                job_id: Id | None = None, **options: Any) -> CommandResult:
        return self.command("POST", "/ops/process", _body(
            id=job_id, file_ids=list(file_ids) or None, result_ids=list(result_ids) or None,
            algorithm=algorithm, algorithm_version=algorithm_version, parameters=parameters,
            catalog=catalog, publish=publish, archive=archive), **options)

    def catalog(self, product_ids: Sequence[Id], *, publish: bool | None = None,
                archive: bool | None = None, metadata: Json | None = None,
                job_id: Id | None = None, **options: Any) -> CommandResult:
        return self.command("POST", "/ops/catalog", _body(
            id=job_id, product_ids=list(product_ids), publish=publish, archive=archive,
            metadata=metadata), **options)

    def cancel_job(self, job_id: Id, *, reason: str | None = None,
                   **options: Any) -> CommandResult:
        return self.command("DELETE", f"/ops/jobs/{job_id}", None, params={"reason": reason},
                            **options)

    def jobs(self, *, status: str | None = None, kind: str | None = None,
             skip: int | None = None, limit: int | None = None,
             min_position: int | None = None) -> Json:
        return dict(self.query("/ops/jobs", _body(status=status, kind=kind, skip=skip,
                                                  limit=limit), min_position))

    def job(self, job_id: Id, *, min_position: int | None = None) -> Json:
        return dict(self.query(f"/ops/jobs/{job_id}", None, min_position))

    def products(self, *, status: str | None = None, kind: str | None = None,
                 job_id: Id | None = None, result_id: Id | None = None,
                 skip: int | None = None, limit: int | None = None,
                 min_position: int | None = None) -> Json:
        return dict(self.query("/products", _body(status=status, kind=kind, job_id=job_id,
                                                  result_id=result_id, skip=skip, limit=limit),
                               min_position))

    def product(self, product_id: Id, *, min_position: int | None = None) -> Json:
        return dict(self.query(f"/products/{product_id}", None, min_position))

    def product_lineage(self, product_id: Id, *, format: str | None = None) -> Json:
        """The lineage graph (``format="prov-json"``: W3C PROV-JSON)."""
        return dict(self.query(f"/products/{product_id}/lineage", _body(format=format)))


_OPTIONS = ("idempotency_key", "correlation_id", "wait")


def _options(fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The command options among ``fields``, and the body fields."""
    return ({k: v for k, v in fields.items() if k in _OPTIONS},
            {k: v for k, v in fields.items() if k not in _OPTIONS})


__all__ = ["CommandResult", "ObsLedgerClient", "ObsLedgerError"]
