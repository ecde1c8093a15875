"""Schemathesis against a real coordinator: every operation of its own `/openapi.json`, with
each kind of credential, valid and invalid requests. No answer may be a 5xx or take longer than
REQUEST_TIMEOUT (a hang), and each answer must conform to what the document says of it (status
code, media type, JSON schema).

The coordinator is the real `fleetmesh coordinator serve --no-hub` process on loopback, over
HTTPS with its own certificate. Examples per operation, credential kind and generation mode
(positive: requests the document accepts; negative: requests it forbids) come from
FLEETMESH_FUZZ_EXAMPLES: 25 in `scripts/test`, 200 or more for the long run
(`scripts/bench fuzz`, docs/security.md "API fuzzing"). Hypothesis runs derandomized (the same
examples on every run) and writes no example database.
"""

from __future__ import annotations

import os
import re
import ssl
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
import requests
import requests.auth
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema
from starlette.routing import Route

from coordinator._app import app_routes
from coordinator._openapi import openapi_document
from vpn import generate_keypair

from ..coordinator_process import RunningCoordinator, running_coordinator

EXAMPLES: Final = int(os.environ.get("FLEETMESH_FUZZ_EXAMPLES", "25"))
# Any answer slower than this is a hang. The long polls answer within their `wait`, which the
# fuzzer's requests keep at or below WAIT_CAP (see `_bounded_waits`); everything else answers
# at once on loopback.
REQUEST_TIMEOUT: Final = 10.0
WAIT_CAP: Final = 1.0
# negative_data_rejection: a request the document forbids is refused (4xx), so the document's
# rules are the ones the routes enforce. Not positive_data_acceptance: a valid request may
# rightly be refused (an unknown device, a token already spent).
CHECKS: Final[tuple[CheckFunction, ...]] = (
    not_a_server_error, status_code_conformance, content_type_conformance,
    response_schema_conformance, negative_data_rejection)
# Any 4xx refuses a forbidden request: schemathesis's default list lacks 413, which the
# coordinator answers before it checks a credential when the body is too large, and 408, 416.
CONFIG: Final = {"checks": {"negative_data_rejection": {"expected-statuses": ["4XX"]}}}
MODES: Final = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
KINDS: Final = ("none", "device", "operator", "session", "bogus")
# shaped like real secrets, known to no one
BOGUS_BEARER: Final = "fmd_" + "A" * 43
LOGOUT: Final = "POST /dashboard/logout"


def _documented_operations() -> list[str]:
    """'METHOD /path' of every operation the document lists (its own GET /openapi.json aside,
    which schemathesis does not generate for and `test_openapi_document_is_fetched_...`
    covers)."""
    return [f"{method.upper()} {path}"
            for path, item in openapi_document()["paths"].items() if path != "/openapi.json"
            for method in item]


OPERATIONS: Final = _documented_operations()


class Tally:
    """Statuses answered per (operation, credential kind): what the fuzzer reached (a 2xx
    means a request got past validation and authorization), written out for the long run."""

    def __init__(self) -> None:
        self.statuses: defaultdict[tuple[str, str], Counter[int]] = defaultdict(Counter)
        self.started = time.monotonic()

    def add(self, label: str, kind: str, status: int) -> None:
        self.statuses[label, kind][status] += 1

    def report(self) -> str:
        total = sum(sum(c.values()) for c in self.statuses.values())
        worst = max((s for c in self.statuses.values() for s in c), default=0)
        lines = [f"{total} requests to {len({label for label, _ in self.statuses})} operations"
                 f" x {len(KINDS)} credential kinds ({EXAMPLES} examples per operation, kind "
                 f"and generation mode) in {time.monotonic() - self.started:.0f} s; highest "
                 f"status {worst}"]
        undocumented = sorted({label for label, _ in self.statuses} - set(OPERATIONS))
        for label in [*OPERATIONS, *undocumented]:  # HEAD where only GET is documented
            lines.append(label)
            for kind in KINDS:
                counts = self.statuses.get((label, kind), Counter())
                lines.append(f"  {kind:9} " + " ".join(
                    f"{status}x{n}" for status, n in sorted(counts.items())))
        return "\n".join(lines) + "\n"


TALLY: Final = Tally()


@dataclass
class Live:
    """The running coordinator, its CA file, and one secret of each kind."""

    coordinator: RunningCoordinator
    ca_file: str
    device_credential: str
    schema: OpenApiSchema
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def url(self) -> str:
        return self.coordinator.url

    def sign_in(self) -> tuple[str, str]:
        """A fresh dashboard session: (cookie value, CSRF token)."""
        r = requests.post(f"{self.url}/dashboard/login", data={"key": self.coordinator.api_key},
                          verify=self.ca_file, allow_redirects=False, timeout=REQUEST_TIMEOUT)
        assert r.status_code == 303, r.text
        cookie = r.cookies["fm_session"]
        s = requests.get(f"{self.url}/dashboard/session", cookies={"fm_session": cookie},
                         verify=self.ca_file, timeout=REQUEST_TIMEOUT)
        assert s.status_code == 200, s.text
        return cookie, str(s.json()["csrf"])


def _enroll(url: str, api_key: str, ca_file: str) -> str:
    """A device enrolled with a name the fuzzer will not guess: its credential."""
    auth = {"Authorization": f"Bearer {api_key}"}
    r = requests.post(f"{url}/api/v1/tokens", json={"fleet": "fuzzfleet"}, headers=auth,
                      verify=ca_file, timeout=REQUEST_TIMEOUT)
    assert r.status_code == 201, r.text
    r = requests.post(f"{url}/api/v1/enroll", verify=ca_file, timeout=REQUEST_TIMEOUT, json={
        "token": r.json()["token"], "public_key": generate_keypair().public,
        "name": "fuzz-device-7d1c9e", "agent_version": "fuzz"})
    assert r.status_code == 201, r.text
    return str(r.json()["credential"])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    base = tmp_path_factory.mktemp("fuzz")
    with running_coordinator(base / "data", base / "coordinator.log") as coord:
        ca_file = base / "ca.pem"
        ca_file.write_text(ssl.DER_cert_to_PEM_cert(coord.der))
        credential = _enroll(coord.url, coord.api_key, str(ca_file))
        schema = schemathesis.openapi.from_url(f"{coord.url}/openapi.json", verify=str(ca_file),
                                               config=schemathesis.Config.from_dict(CONFIG),
                                               timeout=REQUEST_TIMEOUT)
        found = Live(coord, str(ca_file), credential, schema)
        try:
            yield found
        finally:
            found.session.close()
            report = os.environ.get("FLEETMESH_FUZZ_REPORT")
            if report:
                Path(report).write_text(TALLY.report())
            _no_tracebacks(base / "coordinator.log")


def _no_tracebacks(log: Path) -> None:
    """The coordinator logged no internal error while it was fuzzed (a 5xx answered by a
    handler that caught it would still show here)."""
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "internal error" not in text, text[-4000:]


# --------------------------------------------------------------------------- credentials


class Credential(requests.auth.AuthBase):
    """Headers set on the request as it leaves, after schemathesis has built it: in negative
    mode schemathesis treats Authorization as a parameter to leave out, and a missing
    credential is already the kind "none"."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers.update(self.headers)
        return request


def _credential(live: Live, kind: str, label: str
                ) -> Callable[[], tuple[Credential, dict[str, str]]]:
    """(headers, cookies) to send with each example of `label` for credential `kind`: made
    anew for each example of the sign-out, which ends its session."""
    if kind == "none":
        return lambda: (Credential({}), {})
    if kind in ("device", "operator", "bogus"):
        secret = {"device": live.device_credential, "operator": live.coordinator.api_key,
                  "bogus": BOGUS_BEARER}[kind]
        return lambda: (Credential({"Authorization": f"Bearer {secret}"}), {})

    def session() -> tuple[Credential, dict[str, str]]:
        cookie, csrf = live.sign_in()
        return Credential({"X-CSRF-Token": csrf}), {"fm_session": cookie}

    if label == LOGOUT:  # each example ends its session: the next one signs in anew
        return session
    fixed = session()
    return lambda: fixed


def _put_credentials(case: Case[Any], auth: Credential) -> None:
    """The kind under test decides what is sent: the fuzzer's own Authorization, CSRF header
    or session cookie give way. Authorization also goes into the case, so that schemathesis
    knows a negative case that left it out (its "missing credential") was sent with one."""
    if case.headers:
        for name in [n for n in case.headers if n.lower() in ("authorization",
                                                               "x-csrf-token")]:
            del case.headers[name]
    if case.cookies:
        case.cookies.pop("fm_session", None)
    bearer = auth.headers.get("Authorization")
    if bearer is not None:
        if case.headers is None:
            case.headers = {}
        case.headers["Authorization"] = bearer


def _bounded_waits(case: Case[Any]) -> Case[Any]:
    """A long poll's `wait` (seconds) at most WAIT_CAP, so that a request answering later than
    REQUEST_TIMEOUT is a hang and not a long poll honoured. Only valid numbers are lowered:
    invalid ones (negative mode) go out as generated."""
    query = case.query
    if query:
        wait = query.get("wait")
        if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > WAIT_CAP:
            query["wait"] = WAIT_CAP
    return case


# --------------------------------------------------------------------------- the fuzzing


def _refused_by_http_parser(response: schemathesis.Response) -> bool:
    """A 400 with no body and no media type: hypercorn's HTTP/1.1 parser (h11) refused a
    malformed message (a header like `content-length: e`) before the app saw it, so the API's
    error shape does not apply. Every refusal of the app itself is JSON."""
    return (response.status_code == 400 and not response.content
            and "content-type" not in {k.lower() for k in response.headers})


def _has_input(operation: Operation) -> bool:
    definition = operation.definition.raw
    return bool(definition.get("parameters") or definition.get("requestBody"))


def _curl(case: Case[Any], headers: dict[str, str]) -> str:
    text = case.as_curl_command(headers=headers, verify=False)
    return re.sub(r"(Bearer |fm_session=|X-CSRF-Token: )[A-Za-z0-9_\-]+", r"\1…", text)


Operation = APIOperation[Any, Any, Any, Any]


def _fuzz(live: Live, operation: Operation, kind: str, mode: GenerationMode,
          credentials: Callable[[], tuple[Credential, dict[str, str]]], *,
          examples: int = EXAMPLES, as_head: bool = False) -> None:
    """`examples` requests of `mode` to `operation`, each with `kind`'s credential; hypothesis
    shrinks a failing one to the smallest it can and reports it. `as_head`: sent as HEAD
    (undocumented but served wherever GET is), where only "not a 5xx" applies."""
    label = f"HEAD {operation.path}" if as_head else operation.label

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(operation.as_strategy(generation_mode=mode).map(_bounded_waits))
    def example(case: Case[Any]) -> None:
        auth, cookies = credentials()
        _put_credentials(case, auth)
        if as_head:
            case.method = "HEAD"
        try:
            response = case.call(base_url=live.url, session=live.session, auth=auth,
                                 cookies=cookies, verify=live.ca_file, timeout=REQUEST_TIMEOUT)
        except requests.Timeout:
            raise AssertionError(f"hang: no answer within {REQUEST_TIMEOUT:g} s ({kind}, "
                                 f"{mode.value}): {_curl(case, auth.headers)}") from None
        except requests.ConnectionError as exc:
            raise AssertionError(f"connection failed ({kind}, {mode.value}): {exc}; "
                                 f"{_curl(case, auth.headers)}") from None
        TALLY.add(label, kind, response.status_code)
        only_5xx = as_head or _refused_by_http_parser(response)
        case.validate_response(response, checks=[not_a_server_error] if only_5xx else list(CHECKS))

    try:
        example()
    except Unsatisfiable:
        pytest.fail(f"{label} ({mode.value}): schemathesis could generate no request")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("label", OPERATIONS)
def test_operation(live: Live, label: str, kind: str) -> None:
    method, path = label.split(" ", 1)
    operation = live.schema[path][method]
    credentials = _credential(live, kind, label)
    for mode in MODES:
        if mode is GenerationMode.NEGATIVE and not _has_input(operation):
            continue  # nothing to make invalid: no parameters, no body
        _fuzz(live, operation, kind, mode, credentials)


GETS: Final = [label for label in OPERATIONS if label.startswith("GET ")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("label", GETS)
def test_head_where_get_is(live: Live, label: str, kind: str) -> None:
    """Starlette answers HEAD wherever GET is, through the GET handler; the document lists it
    only for blobs. A fifth of the examples, positive ones: never a 5xx, never a hang."""
    operation = live.schema[label.split(" ", 1)[1]]["GET"]
    _fuzz(live, operation, kind, GenerationMode.POSITIVE, _credential(live, kind, label),
          examples=max(5, EXAMPLES // 5), as_head=True)


# --------------------------------------------------------------------------- the document


def test_openapi_document_is_fetched_and_lists_every_route(live: Live) -> None:
    """The served document is the one the operations above were taken from, and it names
    every (path, method) the app routes, and nothing it does not: what the fuzzer covers is
    what the coordinator serves. HEAD is implied wherever GET is (RFC 9110, 9.3.2), so the
    document lists it only where it is part of the contract (blobs)."""
    r = requests.get(f"{live.url}/openapi.json", verify=live.ca_file, timeout=REQUEST_TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    served = r.json()
    assert served == openapi_document()
    documented = {(path, method.upper()) for path, item in served["paths"].items()
                  for method in item}
    routed = {(route.path, method) for route in app_routes() if isinstance(route, Route)
              for method in route.methods or ()}
    assert len(routed) and all(isinstance(route, Route) for route in app_routes())
    assert documented - routed == set(), "documented but not served"
    assert {(p, m) for p, m in routed if m != "HEAD"} - documented == set(), \
        "served but not documented"
    fuzzed = {tuple(label.split(" ", 1)[::-1]) for label in OPERATIONS}
    assert documented - fuzzed == {("/openapi.json", "GET")}


@pytest.mark.parametrize("kind", ["none", "bogus", "device", "operator"])
def test_openapi_document_answers_every_credential(live: Live, kind: str) -> None:
    """GET /openapi.json, which schemathesis leaves out (it is the document), with each
    bearer: the same document, whoever asks."""
    headers = {"none": {}, "bogus": {"Authorization": f"Bearer {BOGUS_BEARER}"},
               "device": {"Authorization": f"Bearer {live.device_credential}"},
               "operator": {"Authorization": f"Bearer {live.coordinator.api_key}"}}[kind]
    r = requests.get(f"{live.url}/openapi.json", headers=headers, verify=live.ca_file,
                     timeout=REQUEST_TIMEOUT)
    assert r.status_code == 200 and r.json() == openapi_document()
