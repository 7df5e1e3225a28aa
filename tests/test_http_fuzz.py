"""Hostile HTTP: property-based fuzzing of every endpoint, generated from alto's own
``/openapi.json``, and the tricks a fuzzer does not think of.

1. The ingress body's schema is derived from the input type's protobuf descriptor; it must
   agree with ``json_format`` both ways: every body generated from the schema parses, and
   what ``MessageToDict`` writes validates against it (a message type with every field
   kind, the demo's and FacTool's types, Struct).
2. schemathesis generates requests for every operation of the served document, positive
   (fits the schema) and negative (does not), and sends them to a real hypercorn server on
   127.0.0.1 running the app with the test fake runtime (``tests/control_fake.py``) in a
   thread of its own. Checks: no 5xx, every status documented, every response's media type
   and body as documented (SSE events too), every refusal a JSON 4xx whose ``error`` is a
   non-empty string, negative data refused, every call bounded (a timeout; endless event
   streams are read for at most that long).
3. By hand: path tricks against the dashboard's static files, wrong, missing and garbage
   tokens, huge and malformed bodies, wrong content types, methods a path does not take;
   over a raw socket where an HTTP client would normalise the request.
4. (slow) the same fuzzing against a real ``alto serve configs/demo.toml`` (real instance
   processes) through ``alto.testing.open_server``; the server still answers requests
   exactly afterwards, and scaling never went past the deployment's limits.

The default suite runs a bounded, derandomized number of examples per operation and mode
(``ALTO_FUZZ_EXAMPLES``, default 25; 8 against the real server). To fuzz longer::

    ALTO_FUZZ_EXAMPLES=2000 .venv/bin/pytest tests/test_http_fuzz.py -q
    ALTO_FUZZ_SEED=7 ALTO_FUZZ_EXAMPLES=500 .venv/bin/pytest tests/test_http_fuzz.py -q -m slow

(``ALTO_FUZZ_SEED`` switches derandomization off and draws from that seed instead.) Or point
schemathesis' own CLI at a running server::

    .venv/bin/st run http://127.0.0.1:8470/openapi.json --header 'Authorization: Bearer TOKEN' \\
        --max-examples 1000 --checks all
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
import trio
from control_fake import LimitedFakeRuntime
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import CheckContext
from schemathesis.config import SchemathesisConfig
from schemathesis.core.result import Ok
from schemathesis.core.transport import Response as StResponse
from schemathesis.generation.case import Case
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from trio_thread import TrioThread

import alto
from alto.control import serve_control
from alto.control._jsonschema import message_schema
from alto.control._openapi import openapi_document
from alto.examples.demo_pb2 import Number, Total
from alto.factool.factool_pb2 import Candidates, EncodedQuery, Question
from alto.testing import open_server

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = int(os.environ.get("ALTO_FUZZ_EXAMPLES", "25"))
REAL_EXAMPLES = int(os.environ.get("ALTO_FUZZ_EXAMPLES", "8"))
SEED = os.environ.get("ALTO_FUZZ_SEED")
CALL_TIMEOUT = 10.0  # seconds; an event stream is read for at most this long in all


# -- 1. the derived schema agrees with json_format -------------------------------------------


def _rich_type() -> type[Message]:
    """This message type, built from a FileDescriptorProto (no protoc at test time)::
    syntax = "proto3";
    package alto.fuzz;
    import "google/protobuf/struct.proto";
    import "google/protobuf/timestamp.proto";
    import "google/protobuf/wrappers.proto";
    enum Colour { COLOUR_UNSET = 0; RED = 1; GREEN = 2; }
    message Inner { string text_value = 1; repeated Inner children = 2; }
    message Rich {
      int32 i32 = 1; sint32 s32 = 2; uint32 u32 = 3; fixed32 f32 = 4;
      int64 i64 = 5; uint64 u64 = 6; sfixed64 sf64 = 7;
      float real32 = 8; double real64 = 9; bool flag = 10; string name = 11; bytes blob = 12;
      Colour colour = 13; repeated int64 many_numbers = 14; repeated string tags = 15;
      map<string, int64> counts = 16; map<int32, Inner> by_number = 17; map<bool, string> by_flag = 18;
      Inner inner = 19; oneof choice { string choice_text = 20; int32 choice_number = 21; }
      optional int32 maybe = 22; google.protobuf.Struct extra = 23;
      google.protobuf.Timestamp at = 24; google.protobuf.Int64Value wrapped = 25;
    }
    """
    fd = descriptor_pb2.FileDescriptorProto(
        name="alto_fuzz_rich.proto", package="alto.fuzz", syntax="proto3"
    )
    fd.dependency.extend(
        [
            "google/protobuf/struct.proto",
            "google/protobuf/timestamp.proto",
            "google/protobuf/wrappers.proto",
        ]
    )
    colour = fd.enum_type.add(name="Colour")
    for i, name in enumerate(("COLOUR_UNSET", "RED", "GREEN")):
        colour.value.add(name=name, number=i)
    F = descriptor_pb2.FieldDescriptorProto
    inner = fd.message_type.add(name="Inner")
    inner.field.add(name="text_value", number=1, type=F.TYPE_STRING, json_name="textValue")
    inner.field.add(
        name="children",
        number=2,
        type=F.TYPE_MESSAGE,
        type_name=".alto.fuzz.Inner",
        label=F.LABEL_REPEATED,
        json_name="children",
    )
    rich = fd.message_type.add(name="Rich")
    rich.oneof_decl.add(name="choice")
    rich.oneof_decl.add(name="_maybe")

    def add(name: str, number: int, kind: int, **kw: Any) -> None:
        camel = "".join(p.title() if i else p for i, p in enumerate(name.split("_")))
        rich.field.add(name=name, number=number, type=kind, json_name=camel, **kw)

    for n, (name, kind) in enumerate(
        [
            ("i32", F.TYPE_INT32), ("s32", F.TYPE_SINT32), ("u32", F.TYPE_UINT32),
            ("f32", F.TYPE_FIXED32), ("i64", F.TYPE_INT64), ("u64", F.TYPE_UINT64),
            ("sf64", F.TYPE_SFIXED64), ("real32", F.TYPE_FLOAT), ("real64", F.TYPE_DOUBLE),
            ("flag", F.TYPE_BOOL), ("name", F.TYPE_STRING), ("blob", F.TYPE_BYTES),
        ],
        start=1,
    ):  # fmt: skip
        add(name, n, kind)
    add("colour", 13, F.TYPE_ENUM, type_name=".alto.fuzz.Colour")
    add("many_numbers", 14, F.TYPE_INT64, label=F.LABEL_REPEATED)
    add("tags", 15, F.TYPE_STRING, label=F.LABEL_REPEATED)
    for number, (name, key, value, value_type) in enumerate(
        [
            ("counts", F.TYPE_STRING, F.TYPE_INT64, ""),
            ("by_number", F.TYPE_INT32, F.TYPE_MESSAGE, ".alto.fuzz.Inner"),
            ("by_flag", F.TYPE_BOOL, F.TYPE_STRING, ""),
        ],
        start=16,
    ):
        entry_name = "".join(p.title() for p in name.split("_")) + "Entry"
        entry = rich.nested_type.add(name=entry_name)
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=key, json_name="key")
        entry.field.add(name="value", number=2, type=value, json_name="value")
        if value_type:
            entry.field[1].type_name = value_type
        add(
            name,
            number,
            F.TYPE_MESSAGE,
            type_name=f".alto.fuzz.Rich.{entry_name}",
            label=F.LABEL_REPEATED,
        )
    add("inner", 19, F.TYPE_MESSAGE, type_name=".alto.fuzz.Inner")
    add("choice_text", 20, F.TYPE_STRING, oneof_index=0)
    add("choice_number", 21, F.TYPE_INT32, oneof_index=0)
    add("maybe", 22, F.TYPE_INT32, oneof_index=1, proto3_optional=True)
    add("extra", 23, F.TYPE_MESSAGE, type_name=".google.protobuf.Struct")
    add("at", 24, F.TYPE_MESSAGE, type_name=".google.protobuf.Timestamp")
    add("wrapped", 25, F.TYPE_MESSAGE, type_name=".google.protobuf.Int64Value")
    pool = descriptor_pool.DescriptorPool()
    for dep in (struct_pb2, timestamp_pb2, wrappers_pb2):
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(dep.DESCRIPTOR.serialized_pb))
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("alto.fuzz.Rich"))


RICH = _rich_type()
TYPES = [RICH, Number, Total, Question, Candidates, EncodedQuery, struct_pb2.Struct]


def _body_document(input_type: type[Message]) -> dict[str, Any]:
    components: dict[str, Any] = {}
    schema = message_schema(input_type, components)
    return {
        "openapi": "3.1.0",
        "info": {"title": "body", "version": "1"},
        "paths": {
            "/body": {
                "post": {
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": schema}},
                    },
                    "responses": {"200": {"description": "ok"}},
                }
            }
        },
        "components": {"schemas": components},
    }


def _validator(input_type: type[Message]) -> jsonschema_rs.Validator:
    components: dict[str, Any] = {}
    root = message_schema(input_type, components)
    return jsonschema_rs.validator_for({**root, "components": {"schemas": components}})


def _parse(body: Any, input_type: type[Message]) -> Message:
    return json_format.ParseDict(body, input_type())


@pytest.mark.parametrize("input_type", TYPES, ids=lambda t: t.DESCRIPTOR.full_name)
def test_every_body_the_schema_allows_parses_and_every_output_validates(
    input_type: type[Message],
) -> None:
    doc = schemathesis.openapi.from_dict(_body_document(input_type))
    result = next(iter(doc.get_all_operations()))
    assert isinstance(result, Ok), result
    operation = result.ok()
    validator = _validator(input_type)
    seen: list[Any] = []

    @settings(
        max_examples=max(EXAMPLES, 60),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def check(case: Case[Any]) -> None:
        message = _parse(case.body, input_type)  # raises ParseError: the schema is too loose
        seen.append(case.body)
        out = json_format.MessageToDict(message)
        errors = [e.message for e in validator.iter_errors(out)]
        assert not errors, (case.body, out, errors)

    check()
    assert len(seen) > 1


def test_the_rich_schema_says_what_json_format_refuses() -> None:
    validator = _validator(RICH)
    good = {
        "i32": -5,
        "i64": "-9223372036854775808",
        "u64": 18446744073709551615,
        "real32": "NaN",
        "blob": "aGVsbG8",  # unpadded
        "colour": "RED",
        "manyNumbers": ["1", 2],
        "counts": {"a": "1"},
        "byNumber": {"-3": {"textValue": "x", "children": [{}]}},
        "byFlag": {"true": "yes"},
        "choice_text": "one member of the oneof",
        "extra": {"anything": [1, {"goes": None}]},
        "at": "2024-05-01T12:00:00Z",
        "wrapped": "7",
    }
    assert validator.is_valid(good), [e.message for e in validator.iter_errors(good)]
    _parse(good, RICH)
    bad_bodies = [
        {"nope": 1},  # unknown field
        {"i32": 2**31},  # out of range
        {"u32": -1},
        {"i64": "12a"},
        {"real32": 1e39},  # past float32
        {"flag": "true"},  # a string is no bool
        {"blob": "a"},  # one character cannot be base64
        {"colour": "BLUE"},
        {"manyNumbers": [None]},
        {"choiceText": "x", "choiceNumber": 1},  # two members of a oneof
        {"choiceText": "x", "choice_text": "y"},  # one member under both its names
        {"at": "yesterday"},
        {"byFlag": {"maybe": "x"}},
    ]
    for body in bad_bodies:
        assert not validator.is_valid(body), body
        with pytest.raises(json_format.ParseError):
            _parse(body, RICH)


def test_both_names_of_a_field_are_described() -> None:
    components: dict[str, Any] = {}
    message_schema(RICH, components)
    properties = components["alto.fuzz.Rich"]["properties"]
    for original, camel, value in (
        ("many_numbers", "manyNumbers", ["1", 2]),
        ("by_number", "byNumber", {"7": {"text_value": "x"}}),
        ("choice_text", "choiceText", "y"),
    ):
        assert properties[original] == properties[camel]
        assert _parse({original: value}, RICH) == _parse({camel: value}, RICH)
    assert "manyNumbers / many_numbers" in components["alto.fuzz.Rich"]["description"]


# -- a control plane on a real socket, in a thread of its own --------------------------------


class ControlThread(TrioThread[int]):
    """``serve_control`` for ``runtime`` on 127.0.0.1, port 0, in its own thread and trio run
    (schemathesis calls are blocking)."""

    thread_name = "alto-fuzz-control"
    start_timeout = stop_timeout = 30.0

    def __init__(self, runtime: Any, token: str | None = TOKEN) -> None:
        super().__init__()
        self.runtime = runtime
        self.token = token
        self.url = ""

    def __enter__(self) -> ControlThread:  # type: ignore[override]
        self.url = f"http://127.0.0.1:{self.start()}"
        return self

    async def main(self, ready: Callable[[int], None]) -> None:
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(
                partial(
                    serve_control,
                    self.runtime,
                    "127.0.0.1",
                    0,
                    token=self.token,
                    stream_interval=0.05,
                )
            )
            ready(port)


@pytest.fixture
def control() -> Iterator[ControlThread]:
    runtime = LimitedFakeRuntime(max_instances=8, stage_limits={"sum": 3})
    with ControlThread(runtime) as thread:
        yield thread


# -- 2. fuzzing from /openapi.json -----------------------------------------------------------


def refusal_is_json_error(ctx: CheckContext, response: StResponse, case: Case[Any]) -> bool | None:
    """Every 4xx: a JSON object whose ``error`` is a non-empty string."""
    if 400 <= response.status_code < 500:
        media = response.headers.get("content-type", [""])[0]
        assert media.startswith("application/json"), (response.status_code, media)
        body = json.loads(response.content)
        assert isinstance(body.get("error"), str) and body["error"].strip(), body
    return None


def no_server_error(ctx: CheckContext, response: StResponse, case: Case[Any]) -> bool | None:
    """No 5xx, except the 503 by which /readyz says "not ready" (documented)."""
    status = response.status_code
    if status >= 500 and not (case.operation.path == "/readyz" and status == 503):
        raise AssertionError(f"{status} from {case.method} {case.formatted_path}")
    return None


CHECKS = [
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    refusal_is_json_error,
]


@dataclass
class FuzzReport:
    calls: dict[str, int] = field(default_factory=dict)  # operation and mode -> calls
    statuses: dict[str, set[int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def note(self, key: str, status: int) -> None:
        self.calls[key] = self.calls.get(key, 0) + 1
        self.statuses.setdefault(key, set()).add(status)


def fuzz(
    url: str,
    examples: int,
    *,
    token: str | None = TOKEN,
    adjust: Callable[[Case[Any]], None] | None = None,
) -> FuzzReport:
    """Fuzz every operation of ``url``'s own /openapi.json, positive and negative.

    ``adjust`` may change a generated case before it is sent (bounding work that a valid
    request legitimately asks for). Returns what was called and what failed; a failure
    names the operation, the mode, the check's message and a curl line to reproduce it.
    """
    config = SchemathesisConfig.from_dict(
        {"auth": {"openapi": {"bearer": {"bearer": token}}}} if token else {}
    )
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config, timeout=30)
    report = FuzzReport()

    def sender(key: str) -> Callable[[Case[Any]], None]:
        def one(case: Case[Any]) -> None:
            if adjust is not None:
                adjust(case)
            try:
                response = case.call(base_url=url, timeout=CALL_TIMEOUT)
            except Exception as exc:  # a timeout is a hang: fail, naming the call
                report.failures.append(f"{key}: {type(exc).__name__}: {exc}")
                return
            report.note(key, response.status_code)
            try:
                case.validate_response(response, checks=CHECKS)
            except Exception as exc:
                report.failures.append(f"{key}: {str(exc)[:3000]}")

        return one

    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the served document is valid
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            key = f"{operation.label} ({mode})"
            runner = settings(
                max_examples=examples,
                derandomize=SEED is None,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate],
            )(given(case=operation.as_strategy(generation_mode=mode))(sender(key)))
            if SEED is not None:
                runner = seed(int(SEED))(runner)
            try:
                runner()
            except Unsatisfiable:
                # Nothing in the operation can be made invalid (a GET without
                # parameters): there is no negative request to send.
                assert mode is GenerationMode.NEGATIVE, key
    return report


def check_report(report: FuzzReport, expected_operations: set[str]) -> None:
    assert not report.failures, "\n\n".join(report.failures[:10])
    operations = {key.rsplit(" (", 1)[0] for key in report.calls}
    assert operations >= expected_operations, sorted(expected_operations - operations)


# Every operation of the document (schemathesis leaves out the document's own path).
OPERATIONS = {
    "GET /api/pipeline",
    "GET /api/instances",
    "GET /api/stream",
    "POST /api/stages/{stage}/scale",
    "POST /api/instances/{instance_id}/drain",
    "POST /v1/pipelines/{name}/requests",
    "GET /metrics",
    "GET /healthz",
    "GET /readyz",
    "GET /",
    "GET /dashboard/{filename}",
}


def test_openapi_describes_the_served_ingress_and_limits(control: ControlThread) -> None:
    doc = httpx.get(f"{control.url}/openapi.json", timeout=10).json()
    assert doc["openapi"] == "3.1.0"
    ingress = doc["paths"]["/v1/pipelines/{name}/requests"]["post"]
    # The body is the input type's JSON form (the fake's input is a Struct: any object).
    assert ingress["requestBody"]["content"]["application/json"]["schema"]["type"] == "object"
    assert "google.protobuf.Struct" in ingress["requestBody"]["description"]
    params = {p["name"]: p for p in ingress["parameters"]}
    assert params["name"]["in"] == "path" and params["name"]["schema"]["enum"] == ["wordcount"]
    assert params["stream"]["in"] == "query" and "false" in params["stream"]["schema"]["enum"]
    assert ingress["security"] == [{"bearer": []}]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert {"400", "401", "404", "413", "415", "429"} <= set(ingress["responses"])
    for status, response in ingress["responses"].items():
        if status != "200":
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}, status
    scale = doc["paths"]["/api/stages/{stage}/scale"]["post"]
    body = scale["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["instances"] == {"type": "integer", "minimum": 1, "maximum": 8}
    assert body["additionalProperties"] is False
    assert "sum: 3" in scale["description"] and "(8)" in scale["description"]
    assert {"400", "401", "404", "409"} <= set(scale["responses"])
    stage = next(p for p in scale["parameters"] if p["name"] == "stage")
    assert stage["schema"]["enum"] == ["split", "score", "sum"]
    assert set(doc["paths"]) >= {op.split(" ", 1)[1] for op in OPERATIONS} | {"/openapi.json"}


async def test_openapi_of_a_protobuf_input_type() -> None:
    stats = LimitedFakeRuntime().statistics()
    doc = openapi_document(stats, Number, auth=False)
    ingress = doc["paths"]["/v1/pipelines/{name}/requests"]["post"]
    ref = ingress["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    number = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert number["additionalProperties"] is False
    assert number["properties"]["value"]["type"] == ["string", "integer"]  # int64
    assert "security" not in ingress and "401" not in ingress["responses"]  # no token


def test_fuzz_every_endpoint_of_the_fake(control: ControlThread) -> None:
    report = fuzz(control.url, EXAMPLES)
    check_report(report, OPERATIONS)
    # The fuzzer got past the token and the validation: some requests were carried out.
    assert 200 in report.statuses["POST /v1/pipelines/{name}/requests (positive)"]
    assert 200 in report.statuses["POST /api/stages/{stage}/scale (positive)"]
    assert report.statuses["POST /api/stages/{stage}/scale (negative)"] <= {400, 401, 404, 409}


def test_fuzz_without_a_token() -> None:
    with ControlThread(LimitedFakeRuntime(), token=None) as thread:
        report = fuzz(thread.url, max(5, EXAMPLES // 4), token=None)
    check_report(report, OPERATIONS)
    statuses = set().union(*report.statuses.values())
    assert 401 not in statuses


# -- 3. by hand --------------------------------------------------------------------------


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(url: str, request: bytes, timeout: float = CALL_TIMEOUT) -> Raw:
    """Send ``request`` byte for byte (no client normalises its path) and read the answer
    to EOF: every request here says ``Connection: close``, so the server must close."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            assert time.monotonic() < deadline, f"no EOF within {timeout} s: {data[:300]!r}"
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        decoded, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            decoded, rest = decoded + rest[:n], rest[n + 2 :]
        body = decoded
    return Raw(status, headers, body)


def get(url: str, path: bytes, extra: bytes = b"") -> Raw:
    return raw_request(
        url, b"GET " + path + b" HTTP/1.1\r\nHost: alto\r\nConnection: close\r\n" + extra + b"\r\n"
    )


def post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> Raw:
    lines = [f"POST {path} HTTP/1.1", "Host: alto", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers if headers is not None else AUTH).items()]
    lines.append(f"Content-Length: {len(body)}")
    return raw_request(url, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


def refused(answer: Raw, status: int | tuple[int, ...], *words: str) -> str:
    """``answer`` is a JSON refusal with this status whose error says ``words``."""
    statuses = (status,) if isinstance(status, int) else status
    assert answer.status in statuses, (answer.status, answer.body[:500])
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    error = answer.json()["error"]
    assert isinstance(error, str) and error.strip()
    for word in words:
        assert word in error, (word, error)
    return error


SECRET_FILES = [ROOT / "pyproject.toml", ROOT / "README.md", Path("/etc/passwd")]
PATH_TRICKS = [
    b"/dashboard/../../etc/passwd",
    b"/dashboard/../pyproject.toml",
    b"/dashboard/%2e%2e/%2e%2e/etc/passwd",
    b"/dashboard/%2E%2E/pyproject.toml",
    b"/dashboard/..%2f..%2fetc%2fpasswd",
    b"/dashboard/..%2Fpyproject.toml",
    b"/dashboard/%252e%252e/pyproject.toml",  # double-encoded
    b"/dashboard/..%5c..%5cpyproject.toml",  # backslashes
    b"/dashboard/..\\pyproject.toml",
    b"/dashboard//etc/passwd",  # an absolute path
    b"/dashboard/%2fetc%2fpasswd",
    b"/dashboard/" + str(ROOT / "README.md").encode(),
    b"/dashboard/app.js%00",  # NUL bytes
    b"/dashboard/%00../pyproject.toml",
    b"/dashboard/app.js%00.css",
    b"/dashboard/" + b"a" * 4000,  # longer than a file name may be
    b"/dashboard/" + b"a/" * 1500 + b"b",  # deeper than a path may be
    b"/dashboard/" + b"%2e%2e%2f" * 200 + b"etc/passwd",
    b"/dashboard/.",
    b"/dashboard/..",
    b"/dashboard/",
    b"/../pyproject.toml",
    b"/dashboard/app.js/../../pyproject.toml",
]


@pytest.mark.parametrize("path", PATH_TRICKS, ids=lambda p: p[:60].decode("latin-1"))
def test_path_tricks_never_leave_the_dashboard_directory(
    control: ControlThread, path: bytes
) -> None:
    answer = get(control.url, path)
    for secret in SECRET_FILES:
        if secret.exists():
            first_line = secret.read_bytes().splitlines()[0]
            assert first_line not in answer.body, (path, secret)
    if answer.status == 200:  # normalised into the directory: one of its own files
        assert answer.body == (ROOT / "dashboard" / "app.js").read_bytes(), path
    else:
        refused(answer, (400, 404))


def test_the_dashboard_itself_is_served(control: ControlThread) -> None:
    for path, name in ((b"/", "index.html"), (b"/dashboard/app.js", "app.js")):
        answer = get(control.url, path)
        assert answer.status == 200 and answer.body == (ROOT / "dashboard" / name).read_bytes()
    refused(get(control.url, b"/dashboard/no-such.js"), 404, "no-such.js")


TOKENS = {
    "missing": None,
    "empty": "",
    "scheme only": "Bearer",
    "blank": "Bearer    ",
    "basic": f"Basic {TOKEN}",
    "wrong": "Bearer wrong",
    "prefix of the token": f"Bearer {TOKEN[:-1]}",
    "token plus a byte": f"Bearer {TOKEN}x",
    "latin-1 garbage": "Bearer \xff\xfe\xe9",
    "8 KiB": "Bearer " + "x" * 8192,
    "two tokens": f"Bearer {TOKEN} {TOKEN}",
}


@pytest.mark.parametrize("kind", list(TOKENS))
@pytest.mark.parametrize(
    "path, body",
    [
        ("/api/stages/sum/scale", b'{"instances": 2}'),
        ("/api/instances/1/drain", b""),
        ("/v1/pipelines/wordcount/requests", b'{"text": "a b"}'),
    ],
)
def test_wrong_missing_and_garbage_tokens(
    control: ControlThread, kind: str, path: str, body: bytes
) -> None:
    value = TOKENS[kind]
    headers = {} if value is None else {"Authorization": value}
    before = control.runtime.scale_events, control.runtime.submitted
    answer = post(control.url, path, body, headers)
    error = refused(answer, 401, "token")
    assert answer.headers["www-authenticate"].startswith('Bearer realm="alto"'), answer.headers
    assert TOKEN not in error
    assert (control.runtime.scale_events, control.runtime.submitted) == before


def test_the_scheme_is_case_insensitive(control: ControlThread) -> None:
    answer = post(
        control.url,
        "/api/stages/sum/scale",
        b'{"instances": 2}',
        {"Authorization": f"bearer {TOKEN}"},
    )
    assert answer.status == 200, answer.body


BAD_BODIES = [
    (b"", 400, "malformed JSON"),
    (b"{", 400, "malformed JSON"),
    (b"\xff\xfe\x00", 400, "malformed JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (b'{"instances": ' + b"9" * 5000 + b"}", 400, "4300 digits"),
    (b"null", 400, "expected a JSON object"),
    (b"[]", 400, "expected a JSON object"),
    (b'"4"', 400, "expected a JSON object"),
    (b"{}", 400, "instances is null"),
    (b'{"instances": "4"}', 400, 'instances is "4"'),
    (b'{"instances": true}', 400, "instances is true"),
    (b'{"instances": 2.5}', 400, "instances is 2.5"),
    (b'{"instances": NaN}', 400, "instances is NaN"),
    (b'{"instances": 1e999}', 400, "instances is Infinity"),
    (b'{"instances": 0}', 400, "at least 1"),
    (b'{"instances": -3}', 400, "at least 1"),
    (b'{"instances": 2, "force": true}', 400, "unknown key 'force'"),
    (b'{"instances": 100000}', 409, "max_instances"),
    (b'{"instances": 1e300}', 409, "max_instances"),
    (b'{"instances": 4}', 409, "at most 3"),  # past the stage's own limit
]


@pytest.mark.parametrize("body, status, words", BAD_BODIES, ids=lambda x: repr(x)[:40])
def test_malformed_and_hostile_scale_bodies(
    control: ControlThread, body: bytes, status: int, words: str
) -> None:
    before = control.runtime.scale_events, len(control.runtime.instances)
    refused(post(control.url, "/api/stages/sum/scale", body), status, words)
    assert (control.runtime.scale_events, len(control.runtime.instances)) == before


def test_scale_within_limits_and_an_integral_float(control: ControlThread) -> None:
    answer = post(control.url, "/api/stages/sum/scale", b'{"instances": 3.0}')
    assert answer.status == 200 and answer.json()["target_instances"] == 3, answer.body
    assert answer.json()["max_instances"] == 3


def test_no_launcher_is_a_409() -> None:
    with ControlThread(LimitedFakeRuntime(launcher=False)) as thread:
        error = refused(
            post(thread.url, "/api/stages/score/scale", b'{"instances": 3}'), 409, "no launcher"
        )
        assert "instances yourself" in error


INGRESS = "/v1/pipelines/wordcount/requests?stream=false"


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"", 400, "malformed JSON"),
        (b"[" * 50_000, 400, "malformed JSON"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
        (b'{"a":' * 200 + b"1" + b"}" * 200, 400, "does not fit google.protobuf.Struct"),
        (b"[1, 2]", 400, "does not fit"),
        (b"42", 400, "does not fit"),
        (b'{"text": "\\ud800"}', 400, "does not fit"),  # an unpaired surrogate
        (b'{"n": ' + b"1" * 5000 + b"}", 400, "4300 digits"),
    ],
    ids=lambda x: repr(x)[:40],
)
def test_malformed_and_hostile_ingress_bodies(
    control: ControlThread, body: bytes, status: int, words: str
) -> None:
    before = control.runtime.submitted
    refused(post(control.url, INGRESS, body), status, words)
    assert control.runtime.submitted == before


def test_a_huge_body_is_a_413_without_reading_it_all(control: ControlThread) -> None:
    # Declared larger than 16 MiB: refused before a byte of the body is read.
    head = (
        f"POST {INGRESS} HTTP/1.1\r\nHost: alto\r\nConnection: close\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Length: {64 << 20}\r\n\r\n"
    ).encode()
    refused(raw_request(control.url, head + b"{"), 413)
    # Sent chunked, with no end: refused once 16 MiB have arrived.
    chunk = b"100000\r\n" + b" " * 0x100000 + b"\r\n"
    head = (
        f"POST {INGRESS} HTTP/1.1\r\nHost: alto\r\nConnection: close\r\n"
        f"Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    refused(raw_request(control.url, head + chunk * 17), 413)


@pytest.mark.parametrize(
    "content_type, accepted",
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("application/merge-patch+json", True),
        ("application/x-www-form-urlencoded", True),  # what curl -d sends
        ("text/plain;charset=UTF-8", True),  # what fetch sends for a string body
        ("text/xml", False),
        ("multipart/form-data; boundary=x", False),
        ("application/octet-stream", False),
        ("application/protobuf", False),
        ("image/png", False),
        ("", False),
        ("\xff\xfe", False),
    ],
)
def test_content_types(control: ControlThread, content_type: str, accepted: bool) -> None:
    for path, body in (
        ("/api/stages/score/scale", b'{"instances": 2}'),
        (INGRESS, b'{"text": "a bb"}'),
    ):
        answer = post(control.url, path, body, {**AUTH, "Content-Type": content_type})
        if accepted:
            assert answer.status == 200, (path, content_type, answer.body)
        else:
            refused(answer, 415, "not JSON", "application/json")


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("DELETE", "/api/pipeline", "GET"),
        ("PUT", "/api/stages/sum/scale", "POST"),
        ("GET", "/api/stages/sum/scale", "POST"),
        ("PATCH", "/v1/pipelines/wordcount/requests", "POST"),
        ("POST", "/metrics", "GET"),
        ("POST", "/dashboard/app.js", "GET"),
    ],
)
def test_a_method_a_path_does_not_take(
    control: ControlThread, method: str, path: str, allowed: str
) -> None:
    answer = raw_request(
        control.url,
        f"{method} {path} HTTP/1.1\r\nHost: alto\r\nConnection: close\r\n{next(iter(AUTH))}: {AUTH['Authorization']}\r\nContent-Length: 0\r\n\r\n".encode(),
    )
    refused(answer, 405, method, allowed)
    assert allowed in answer.headers["allow"], answer.headers


def test_unknown_paths_and_odd_ids(control: ControlThread) -> None:
    refused(get(control.url, b"/api/nope"), 404, "/api/nope", "/openapi.json")
    refused(post(control.url, "/api/stages/nope/scale", b'{"instances": 2}'), 404, "nope")
    for iid in ("999999999999999999999999", "-1", "1.5", "%00"):
        refused(post(control.url, f"/api/instances/{iid}/drain", b""), 404)
    refused(post(control.url, "/v1/pipelines/other/requests", b"{}"), 404, "other")
    for flag in ("maybe", "", "TRUE", "2"):
        refused(
            post(control.url, f"{INGRESS[: INGRESS.index('?')]}?stream={flag}", b"{}"),
            400,
            "stream",
        )


def test_head_of_the_endless_stream_ends(control: ControlThread) -> None:
    answer = raw_request(
        control.url, b"HEAD /api/stream HTTP/1.1\r\nHost: alto\r\nConnection: close\r\n\r\n"
    )
    assert answer.status == 200 and answer.body == b""


def test_a_closing_client_gets_its_connection_closed(control: ControlThread) -> None:
    # raw_request reads to EOF: each of these fails if the server keeps the socket open.
    for request in (
        b"GET /api/pipeline HTTP/1.1\r\nHost: alto\r\nConnection: close\r\n\r\n",
        b"GET /api/pipeline HTTP/1.0\r\n\r\n",
        b"GET /nope HTTP/1.0\r\n\r\n",
    ):
        assert raw_request(control.url, request, timeout=3).status in (200, 404)


# -- 4. a real alto serve --------------------------------------------------------------------


def _bounded_demo_value(case: Case[Any]) -> None:
    """The demo's generate stage writes ``value`` items 50 ms apart: a valid request for a
    billion items is legitimately a long one, not a hang. Bound it to 12."""
    if case.operation.path == "/v1/pipelines/{name}/requests" and isinstance(case.body, dict):
        value = case.body.get("value")
        try:
            number = int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            return
        if number > 12:
            case.body["value"] = "12" if isinstance(value, str) else 12


@pytest.mark.slow
async def test_fuzz_a_real_alto_serve(tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.toml"
    # Small limits: every positive scale request may really start processes.
    deploy.write_text(
        "[runtime]\nmax_instances = 6\nstop_timeout = 2.0\n"
        "[stages.square]\ninstances = 2\nmax_instances = 3\n"
    )
    async with open_server(
        ROOT / "configs" / "demo.toml", deploy, http="127.0.0.1:0", token=TOKEN
    ) as info:
        assert info.http_url is not None
        report = await trio.to_thread.run_sync(
            partial(fuzz, info.http_url, REAL_EXAMPLES, adjust=_bounded_demo_value)
        )
        check_report(report, OPERATIONS)
        assert 200 in report.statuses["POST /v1/pipelines/{name}/requests (positive)"]
        stats = info.runtime.statistics()
        running = [i for i in stats.instances if str(i.state) not in ("stopped", "crashed")]
        assert len(running) <= 6, running
        for stage in stats.stages:
            assert stage.target_instances <= stage.max_instances, stage
        # Still healthy: exact results for a request over both doors.
        async with httpx.AsyncClient(base_url=info.http_url, headers=AUTH, timeout=60) as client:
            answer = await client.post(
                "/v1/pipelines/demo/requests?stream=false", json={"value": 5}
            )
        assert answer.status_code == 200 and answer.json()["status"] == "done", answer.text
        totals = [r["output"] for r in answer.json()["results"] if r["queue"] == "totals"]
        assert [int(t["total"]) for t in totals] == [0 + 1 + 4 + 9 + 16]
        async with alto.open_client(address="unix:" + info.socket_path, token=info.token) as c:
            results = await c.run(Number(value=4))
        assert [r.message.total for r in results if isinstance(r.message, Total)] == [14]
