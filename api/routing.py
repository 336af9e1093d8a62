"""How a request reaches its endpoint: authenticated before its body is read, the body parsed
within the documented limits (large ones off the event loop), fixed paths before templates.

Every router of the API builds its routes as :class:`GuardedRoute` (``APIRouter(route_class=
GuardedRoute)``); ``api.app.ObsLedgerAPI`` answers wrong methods with :class:`MethodTable`.
"""

from __future__ import annotations

import asyncio
import email.message
import json
import re
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from fastapi import params
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.security import SecurityScopes
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from api.errors import ApiError, ErrorResponse, method_not_allowed
from commands.models import MAX_JSON_DEPTH, CommandModel, json_problem

#: Bodies larger than this are parsed and validated in a worker thread, not on the event loop,
THREAD_PARSE_BYTES = 64 * 1024
#: ... this many at a time.
LARGE_BODIES_AT_ONCE = 1

Handler = Callable[[Request], Coroutine[Any, Any, Response]]

#: What every route documents for a query parameter it does not declare (and bad input).
UNKNOWN_PARAMETER_RESPONSE: dict[str, Any] = {
    "model": ErrorResponse, "description": "Validation failed: the input, or a query "
    "parameter the endpoint does not declare (named in `errors[].field`)"}


def query_parameter_names(route: APIRoute) -> frozenset[str]:
    """The query parameters ``route`` declares, its dependencies' included (a parameter
    given as a pydantic model declares the model's fields)."""
    names: set[str] = set()
    dependants = [route.dependant]
    while dependants:
        dependant = dependants.pop()
        dependants.extend(dependant.dependencies)
        for field in dependant.query_params:
            model = field.field_info.annotation
            if isinstance(model, type) and issubclass(model, BaseModel):
                names.update(f.alias or n for n, f in model.model_fields.items())
            else:
                names.add(field.alias)
    return frozenset(names)


def refuse_unknown_parameters(request: Request, declared: frozenset[str]) -> None:
    """422 in the error format naming each query parameter the route does not declare: a
    misspelt filter (``created_frm``) is refused, not silently ignored."""
    unknown = sorted({k for k in request.query_params if k not in declared})
    if unknown:
        accepted = ", ".join(sorted(declared)) or "none"
        raise ApiError(422, "Validation failed", [
            {"field": f"query.{name}",
             "message": f"unknown query parameter (this endpoint accepts: {accepted})"}
            for name in unknown])


class GuardedRoute(APIRoute):
    """A route that authenticates before it reads the request body, and parses a JSON body
    itself: FastAPI reads and parses the body before solving any dependency, so a client
    without a token could make the server read and parse (and answer 400 to) any body.

    - Routes declaring roles (``api.accounts.allow``) run that check first: no token → 401,
      a token without the roles → 403, and the body is never read.
    - A JSON body is parsed with Python's json module (what FastAPI does), a body nested
      beyond Python's recursion limit is a 422 (not FastAPI's 400), and a body that is not a
      command has its lone surrogates, non-finite numbers and nesting beyond
      :data:`~commands.models.MAX_JSON_DEPTH` refused with 422 naming the field (commands
      check that and more in their model).
    - A body over :data:`THREAD_PARSE_BYTES` is parsed and validated in a worker thread, and
      the endpoint gets the validated model (FastAPI does not validate an instance again).
    - A query parameter the route does not declare is a 422 naming it (after the role check,
      before the body is read); every route documents its 422 in the error format.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], *,
                 responses: dict[int | str, dict[str, Any]] | None = None,
                 **kwargs: Any) -> None:
        responses = dict(responses or {})
        if 422 not in responses and "422" not in responses:
            responses[422] = UNKNOWN_PARAMETER_RESPONSE
        super().__init__(path, endpoint, responses=responses, **kwargs)

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        parameters = query_parameter_names(self)
        checks = [(d.dependency, SecurityScopes(scopes=list(d.scopes)))
                  for d in self.dependencies
                  if isinstance(d, params.Security) and d.scopes and d.dependency is not None]
        body_field = self.body_field
        if body_field is not None and isinstance(body_field.field_info, params.Form):
            body_field = None  # FastAPI parses forms
        model = body_field.field_info.annotation if body_field is not None else None
        command = isinstance(model, type) and issubclass(model, CommandModel)
        # validated in a thread only when the body is the one (not embedded) body parameter
        validate = (body_field is not None and isinstance(model, type)
                    and issubclass(model, BaseModel)
                    and not getattr(self, "_embed_body_fields", True))

        async def guarded(request: Request) -> Response:
            if checks:
                scheme, token = get_authorization_scheme_param(
                    request.headers.get("Authorization"))
                bearer = token if scheme.lower() == "bearer" and token else None
                for check, scopes in checks:
                    await check(request, scopes, bearer)
            if request.scope.get("query_string"):
                refuse_unknown_parameters(request, parameters)
            if body_field is not None and _is_json(request.headers.get("content-type")):
                declared = request.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > THREAD_PARSE_BYTES:
                    # a large body is read once its turn comes: until then it waits in the
                    # connection (flow control), not in memory
                    async with _large_body_slot(request):
                        await _read_json(request, command, body_field if validate else None,
                                         slot_held=True)
                else:
                    await _read_json(request, command, body_field if validate else None)
            return await handler(request)

        return guarded


async def _read_json(request: Request, command: bool, field: Any,
                     slot_held: bool = False) -> None:
    body = await request.body()
    if not body:
        return
    if len(body) <= THREAD_PARSE_BYTES:
        value = _parse(body, command, None)
    elif slot_held:
        value = await run_in_threadpool(_parse, body, command, field)
    else:  # a large body without Content-Length (chunked)
        async with _large_body_slot(request):
            value = await run_in_threadpool(_parse, body, command, field)
    # Starlette keeps a parsed body here; FastAPI reads it with request.json()
    request._json = value


def _large_body_slot(request: Request) -> asyncio.Semaphore:
    """One large body parsed at a time per process: parsing holds the GIL, so more at once
    only share the CPU and multiply the memory of their Python objects (~10x the body)."""
    state = request.app.state
    slot: asyncio.Semaphore | None = getattr(state, "large_body_slot", None)
    if slot is None:
        slot = state.large_body_slot = asyncio.Semaphore(LARGE_BODIES_AT_ONCE)
    return slot


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI would parse a body of this type as JSON."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


def _parse(body: bytes, command: bool, field: Any) -> Any:
    """The parsed body (validated by ``field`` when given); RequestValidationError when the
    body is not JSON (400) or not acceptable JSON (422)."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as e:
        raise RequestValidationError([{
            "type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
            "input": {}, "ctx": {"error": e.msg}}]) from None
    except RecursionError:
        raise _unstorable("body", f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # not UTF-8 (nor UTF-16/32)
        raise RequestValidationError([{
            "type": "json_invalid", "loc": ("body", 0), "msg": f"not UTF-8 text: {e}",
            "input": {}}]) from None
    if not command:  # a command's model checks this and more (commands.models.json_problem)
        found = json_problem(value, command=False)
        if found is not None:
            raise _unstorable(*found)
    if field is None:
        return value
    validated, errors = field.validate(value, {}, loc=("body",))
    if errors:
        raise RequestValidationError(errors)
    return validated


def _unstorable(field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{
        "type": "unstorable", "loc": ("body",), "msg": f"{field}: {message}", "input": None,
        "ctx": {"field": field, "message": message}}])


class MethodTable:
    """The methods each path of an app answers, fixed paths first: a fixed path
    (``/staging/stage``) is never taken for a template's parameter (``/staging/{id}``), so a
    method it does not declare is 405, not the template route's 422 for a bad id; and
    ``Allow`` lists every method of every route of the path."""

    def __init__(self, routes: Iterable[Any]) -> None:
        self.fixed: dict[str, frozenset[str]] = {}
        templated: dict[str, tuple[re.Pattern[str], set[str]]] = {}
        for route in iter_route_contexts(list(routes)):
            path, methods = route.path, set(route.methods or ())
            if not path or not methods:
                continue
            if "{" not in path:
                self.fixed[path] = self.fixed.get(path, frozenset()) | methods
            else:
                regex = route.path_regex
                templated.setdefault(path, (regex, set()))[1].update(methods)
        self.templated = [(regex, frozenset(m)) for regex, m in templated.values()]

    def allowed(self, path: str) -> frozenset[str] | None:
        """The methods of ``path`` (None: no route has it)."""
        fixed = self.fixed.get(path)
        if fixed is not None:
            return fixed
        found: frozenset[str] = frozenset()
        for regex, methods in self.templated:
            if regex.match(path):
                found |= methods
        return found or None

    def refusal(self, path: str, method: str) -> Response | None:
        """405 for a method a fixed path does not declare (None: route as usual)."""
        fixed = self.fixed.get(path)
        if fixed is None or method in fixed:
            return None
        return method_not_allowed(fixed)
