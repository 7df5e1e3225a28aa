"""The OpenAPI 3.1 description served at ``GET /openapi.json``.

Written by hand, except the ingress request body: its schema is derived from the pipeline's
protobuf input type (:mod:`alto.control._jsonschema`), and the path parameters that name a
pipeline or a stage list the served ones. The scale body's upper bound is the runtime's
``max_instances``. Every refusal is documented with its JSON body ``{"error": message}``,
so a client generated from (or a fuzzer driven by) this document knows every answer.

Status codes of refusals, the same on every endpoint:

- 400: the request is malformed (not JSON, not the expected shape, not the input type);
- 401: no bearer token, or the wrong one (only when the server has a token);
- 404: no such stage, instance, pipeline, request (or one that has already ended, for a
  cancellation), path or dashboard file;
- 405: a method the path does not take (``Allow`` lists those it does);
- 409: well-formed, but the runtime's limits or state refuse it: past a stage's or the
  runtime's ``max_instances``, draining a stage's last instance, no launcher to start
  instances with, scaling a stage by hand that the autoscaler owns (the message names its
  range);
- 413: a body past 16 MiB, or an input too large for one frame;
- 415: a body in a media type that is not JSON;
- 429: past ``max_inflight_requests`` (``Retry-After`` says when to retry).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from ..dataplane._stats import RuntimeStatistics
from ._jsonschema import message_schema

__all__ = [
    "JSON_MEDIA_TYPES",
    "MAX_REQUESTS_LISTED",
    "REQUEST_ORDERS",
    "STREAM_FLAGS",
    "TIMEOUT_HEADER",
    "openapi_document",
]

# Media types a JSON body may be declared as. Besides JSON itself: what `curl -d` sends
# (form-urlencoded) and what `fetch` sends for a string body (text/plain), so that the
# README's one-liners work; anything else is a 415.
JSON_MEDIA_TYPES = ("application/json", "application/x-www-form-urlencoded", "text/plain")

# The values of the ingress's `stream` query parameter: three for true, three for false.
STREAM_FLAGS = ("true", "1", "yes", "false", "0", "no")

# The ingress's deadline as a header (the `timeout` query parameter says the same).
TIMEOUT_HEADER = "X-Alto-Timeout"

# GET /api/requests: the orders it lists requests in, and the most it lists at once (the
# runtime remembers the last 1024 finished requests).
REQUEST_ORDERS = ("recent", "slowest")
MAX_REQUESTS_LISTED = 1000

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response = _json(_ERROR, description)
    if headers:
        response["headers"] = headers
    return response


_UNAUTHORIZED = _error(
    "No bearer token, or the wrong one (the server was started with a token).",
    {"WWW-Authenticate": {"schema": {"type": "string"}, "description": 'Bearer realm="alto"'}},
)
_TOO_LARGE = _error("The body is larger than 16 MiB")
_UNSUPPORTED = _error(
    "The body's Content-Type is not JSON (allowed: "
    + ", ".join(JSON_MEDIA_TYPES)
    + ", any +json type, or none)"
)

_REQUEST_ID = {"type": "integer", "minimum": 0}
# The events of one request's result stream, and their data.
_REQUEST_EVENTS: dict[str, dict[str, Any]] = {
    "accepted": {
        "type": "object",
        "required": ["request_id"],
        "properties": {"request_id": _REQUEST_ID},
    },
    "result": {"$ref": "#/components/schemas/Result"},
    "done": {
        "type": "object",
        "required": ["request_id", "results", "latency_s"],
        "properties": {
            "request_id": _REQUEST_ID,
            "results": {"type": "integer", "minimum": 0},
            "latency_s": {"type": "number", "minimum": 0},
        },
    },
    "error": {
        "type": "object",
        "required": ["request_id", "message"],
        "properties": {"request_id": _REQUEST_ID, "message": {"type": "string"}},
    },
}

_READINESS = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"enum": ["ready", "not ready"]},
        "ready_instances": {"type": "object", "additionalProperties": {"type": "integer"}},
        "stages": {"type": "array", "items": {"type": "object"}},
        "error": {"type": "string"},
    },
}

_STAGE = {
    "type": "object",
    "required": ["name", "instances", "target_instances", "max_instances"],
    "properties": {
        "name": {"type": "string"},
        "scheduler": {"type": "string"},
        "stateful": {"type": "boolean"},
        "aggregate_level": {"type": ["integer", "null"]},
        "fanout": {"type": "boolean"},
        "inputs": {"type": "array", "items": {"type": "string"}},
        "outputs": {"type": "array", "items": {"type": "string"}},
        "instances": {
            "type": "array",
            "items": {"type": "integer"},
            "description": "ids of its instances that have not ended (starting ones too)",
        },
        "target_instances": {"type": "integer", "minimum": 0},
        "max_instances": {
            "type": "integer",
            "minimum": 0,
            "description": "the most instances it may have (0: not reported)",
        },
        "frames_processed": {"type": "integer"},
        "errors": {"type": "integer"},
        "autoscale": {
            "description": "the autoscaler's range, or null: the stage is scaled by hand only",
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["min", "max"],
                    "properties": {
                        "min": {"type": "integer", "minimum": 1},
                        "max": {"type": "integer", "minimum": 1},
                    },
                },
            ],
        },
    },
}

_SCALE_EVENT = {
    "type": "object",
    "required": ["time", "stage", "from_instances", "to_instances", "by", "reason"],
    "properties": {
        "time": {"type": "number", "description": "the runtime's clock (seconds)"},
        "age_s": {"type": "number", "minimum": 0},
        "stage": {"type": "string"},
        "from_instances": {"type": "integer"},
        "to_instances": {"type": "integer"},
        "by": {"type": "string", "description": "operator (API, CLI, dashboard) or autoscaler"},
        "reason": {"type": "string"},
    },
}

_REQUEST_STATES = ["running", "done", "failed", "cancelled", "timed_out", "unknown"]

_REQUEST_SUMMARY = {
    "type": "object",
    "required": ["request_id", "status", "latency_s", "results"],
    "properties": {
        "request_id": _REQUEST_ID,
        "status": {"enum": ["done", "failed", "cancelled", "timed_out"]},
        "latency_s": {"type": "number", "minimum": 0},
        "time_to_first_result_s": {"type": ["number", "null"]},
        "results": {"type": "integer", "minimum": 0},
        "error": {"type": ["string", "null"]},
        "traced": {"type": "boolean"},
        "age_s": {"type": "number", "minimum": 0, "description": "seconds since it ended"},
    },
}

_TRACE = {
    "type": "object",
    "description": (
        "Times are seconds since admission (admitted_at is its wall-clock time). A hop is a "
        "partial output passing the runtime, from a stage (or the ingress, or the runtime "
        "itself for a group close) to a stage or the sink; a span is what an instance "
        "reported for one input: received, started, first_output, last_output, ended, "
        "outputs and, on LM stages, gen_ai.* usage attributes and token_times."
    ),
    "required": ["request_id", "trace_id", "span_id", "hops", "spans"],
    "properties": {
        "request_id": _REQUEST_ID,
        "trace_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "span_id": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
        "parent_span_id": {"type": ["string", "null"]},
        "status": {"type": "string"},
        "error": {"type": ["string", "null"]},
        "admitted_at": {"type": "number"},
        "latency_s": {"type": ["number", "null"]},
        "hops": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["t", "from", "to", "queue", "key_path"],
                "properties": {
                    "t": {"type": "number"},
                    "from": {"type": "string"},
                    "from_instance": {"type": ["integer", "null"]},
                    "queue": {"type": "string"},
                    "to": {"type": "string"},
                    "to_instance": {"type": ["integer", "null"]},
                    "key_path": {"type": "array", "items": {"type": "integer"}},
                    "kind": {"type": "string"},
                },
            },
        },
        "spans": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["stage"],
                "properties": {
                    "stage": {"type": "string"},
                    "instance": {"type": "integer"},
                    "key_path": {"type": "array", "items": {"type": "integer"}},
                    "kind": {"type": "string"},
                    "status": {"type": "string"},
                    "received": {"type": "number"},
                    "started": {"type": "number"},
                    "first_output": {"type": "number"},
                    "last_output": {"type": "number"},
                    "ended": {"type": "number"},
                    "outputs": {"type": "integer"},
                    "attributes": {"type": "object"},
                    "token_times": {"type": "array", "items": {"type": "number"}},
                },
            },
        },
        "dropped_events": {"type": "integer", "minimum": 0},
    },
}

_TIMELINE = {
    "type": "object",
    "required": ["request_id", "state"],
    "properties": {
        "request_id": _REQUEST_ID,
        "state": {"enum": _REQUEST_STATES},
        "elapsed_s": {"type": "number", "description": "running requests: seconds so far"},
        "deadline_in_s": {"type": ["number", "null"]},
        "latency_s": {"type": ["number", "null"]},
        "results": {"type": "integer", "minimum": 0},
        "time_to_first_result_s": {"type": ["number", "null"]},
        "error": {"type": ["string", "null"]},
        "trace": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Trace"}]},
    },
}

# The ingress's deadline: the runtime's check_timeout bounds (more than 0, at most a day).
_SECONDS_SCHEMA = {"type": "number", "exclusiveMinimum": 0, "maximum": 86400}
_TRACEPARENT_SCHEMA = {
    "type": "string",
    "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
}
_REQUEST_ID_PATH = {
    "name": "request_id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
}

_INSTANCE = {
    "type": "object",
    "required": ["id", "stage", "state"],
    "properties": {
        "id": {"type": "integer"},
        "stage": {"type": "string"},
        "state": {"enum": ["starting", "ready", "draining", "stopped", "crashed"]},
        "queue_depth": {"type": "integer"},
        "credits": {"type": "integer"},
        "credits_in_use": {"type": "integer"},
        "backlog": {"type": "integer"},
        "open_groups": {"type": "integer"},
        "frames_in": {"type": "integer"},
        "frames_out": {"type": "integer"},
        "pid": {"type": ["integer", "null"]},
        "last_error": {"type": ["string", "null"]},
        "gauges": {
            "type": "object",
            "additionalProperties": {"type": "number"},
            "description": "numbers its stage object reports (an LM engine's token counters...)",
        },
    },
}


def _sse(events: dict[str, dict[str, Any]], description: str) -> dict[str, Any]:
    """An event stream; ``events`` maps each event name to the schema of its JSON data.
    (In OpenAPI 3.1 the schema of ``text/event-stream`` describes one event.)"""
    branches = [
        {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"const": name},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": data,
                },
                "id": {"type": "string"},
                "retry": {"type": "integer"},
            },
        }
        for name, data in events.items()
    ]
    return {
        "description": description,
        "content": {
            "text/event-stream": {
                "schema": branches[0] if len(branches) == 1 else {"oneOf": branches}
            }
        },
    }


def _input_body(
    input_type: type[Message] | None, components: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    if input_type is None:
        return {}, "The JSON form of the pipeline's input message."
    schema = message_schema(input_type, components)
    name = input_type.DESCRIPTOR.full_name
    return schema, (
        f"The JSON form of the pipeline's input message {name} (protobuf's JSON "
        "mapping, as json_format reads it: 64-bit integers as strings or numbers, bytes as "
        "base64, enums by name, repeated fields as arrays; a field under its lowerCamelCase "
        "or its original name; unknown fields are refused)."
    )


def _limit(stats: RuntimeStatistics) -> int | None:
    """The largest count a scale request can ever be granted, if the runtime reports one."""
    limits = [s.max_instances for s in stats.stages if s.max_instances > 0]
    if stats.max_instances > 0:
        limits.append(stats.max_instances)
    return max(limits) if limits else None


def openapi_document(
    stats: RuntimeStatistics,
    input_type: type[Message] | None,
    *,
    auth: bool,
    version: str = "0.1.0",
) -> dict[str, Any]:
    """The document for the runtime that ``stats`` describes.

    ``input_type`` is the pipeline's input message class (``None``: an unconstrained body);
    ``auth`` says whether the mutating endpoints need a bearer token.

    Raises ValueError when the input type has a field with no JSON mapping.
    """
    components: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string", "minLength": 1}},
            "description": "What was wrong, and what is allowed.",
        },
        "Stage": _STAGE,
        "Instance": _INSTANCE,
        "ScaleEvent": _SCALE_EVENT,
        "RequestSummary": _REQUEST_SUMMARY,
        "Trace": _TRACE,
        "Timeline": _TIMELINE,
        "Edge": {
            "type": "object",
            "properties": {
                "from": {"type": "string", "description": "a stage, or `ingress`"},
                "queue": {"type": "string"},
                "to": {"type": "string", "description": "a stage, or `sink`"},
                "routing": {
                    "type": "string",
                    "description": "the scheduler of the stage the edge enters",
                },
                "aggregate_level": {"type": ["integer", "null"]},
            },
        },
        "Result": {
            "type": "object",
            "properties": {
                "request_id": {"type": "integer"},
                "queue": {"type": "string"},
                "key_path": {"type": "array", "items": {"type": "integer"}},
                "output": {"description": "the JSON form of the queue's protobuf message"},
                "payload_base64": {
                    "type": "string",
                    "description": "only when the output could not be decoded",
                },
                "decode_error": {"type": "string"},
            },
        },
    }
    body_schema, body_description = _input_body(input_type, components)
    secured: dict[str, Any] = {"security": [{"bearer": []}]} if auth else {}
    unauthorized: dict[str, Any] = {"401": _UNAUTHORIZED} if auth else {}
    stage_names = [s.name for s in stats.stages]
    limit = _limit(stats)
    instances_schema: dict[str, Any] = {"type": "integer", "minimum": 1}
    if limit is not None:
        instances_schema["maximum"] = limit
    stage_limits = "; ".join(
        f"{s.name}: {s.max_instances}" for s in stats.stages if s.max_instances > 0
    )
    scale_limits = (
        "A count past the stage's `max_instances` "
        + (f"({stage_limits}) " if stage_limits else "")
        + "or one that would take the runtime past its `[runtime] max_instances` "
        + (f"({stats.max_instances}) " if stats.max_instances else "")
        + "instance processes is refused with 409, and nothing is started. So is a "
        + "stage that the autoscaler owns ([stages.NAME.autoscale]: the message names its "
        + "range)."
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"alto control plane: pipeline {stats.pipeline}",
            "version": version,
            "description": (
                "Status, live statistics, scaling and request ingress of one alto runtime. "
                + (
                    "Mutating endpoints and the ingress need `Authorization: Bearer <token>`. "
                    if auth
                    else "This server has no token: nothing needs authentication. "
                )
                + 'Every refusal is a 4xx with a JSON body `{"error": message}`.'
            ),
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the token given to `alto serve --token` (or ALTO_TOKEN)",
                }
            },
            "schemas": components,
        },
        "paths": {
            "/api/pipeline": {
                "get": {
                    "summary": "Stages, queues, edges with their routing policy, and instances",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["pipeline", "stages", "edges", "instances"],
                                "properties": {
                                    "pipeline": {"type": "string"},
                                    "stages": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Stage"},
                                    },
                                    "queues": {"type": "array", "items": {"type": "object"}},
                                    "edges": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Edge"},
                                    },
                                    "instances": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Instance"},
                                    },
                                    "requests": {"type": "object"},
                                    "finished": {
                                        "type": "object",
                                        "description": "requests that ended, by final status (done, failed, cancelled, timed_out), each once",
                                        "additionalProperties": {"type": "integer", "minimum": 0},
                                    },
                                    "scale_log": {
                                        "type": "array",
                                        "description": "the scale events the runtime keeps, oldest first",
                                        "items": {"$ref": "#/components/schemas/ScaleEvent"},
                                    },
                                    "max_instances": {
                                        "type": "integer",
                                        "description": "the runtime's limit on instance processes (0: not reported)",
                                    },
                                },
                            },
                            "The pipeline's shape and current instances",
                        )
                    },
                }
            },
            "/api/instances": {
                "get": {
                    "summary": "Every instance with its state, queue depth, credits and counters",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["instances"],
                                "properties": {
                                    "instances": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Instance"},
                                    }
                                },
                            },
                            "All instances the runtime knows",
                        )
                    },
                }
            },
            "/api/stream": {
                "get": {
                    "summary": "Server-Sent Events: one `stats` event per stream interval",
                    "description": (
                        "Each event carries per-instance state and queue depth, rates "
                        "(frames/s, requests/s), request latency p50/p99, each stage's "
                        "autoscale range and the newest scale events with their reasons "
                        "(`scale_log`). A new client gets "
                        "the current state at once; a slow client skips to the latest event. "
                        "The stream does not end."
                    ),
                    "responses": {
                        "200": _sse(
                            {
                                "stats": {
                                    "type": "object",
                                    "required": ["seq", "pipeline", "time", "stages", "instances"],
                                    "properties": {
                                        "seq": {"type": "integer"},
                                        "pipeline": {"type": "string"},
                                        "time": {"type": "number"},
                                        "stages": {"type": "array", "items": {"type": "object"}},
                                        "instances": {"type": "array", "items": {"type": "object"}},
                                        "scale_log": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/ScaleEvent"},
                                        },
                                    },
                                }
                            },
                            "an endless event stream",
                        )
                    },
                }
            },
            "/api/stages/{stage}/scale": {
                "post": {
                    "summary": "Set a stage's number of instances",
                    "description": (
                        "Answers at once with the new target: new instances start in the "
                        "background (`starting`, then `ready` in `/api/instances` and the "
                        "stream); surplus ones drain (no new groups, pinned work finishes, "
                        "then they stop). " + scale_limits
                    ),
                    **secured,
                    "parameters": [
                        {
                            "name": "stage",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "enum": stage_names}
                            if stage_names
                            else {"type": "string"},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["instances"],
                                    "properties": {"instances": instances_schema},
                                    "additionalProperties": False,
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json(
                            {"$ref": "#/components/schemas/Stage"},
                            "The stage with its new target (new instances may still be starting)",
                        ),
                        "400": _error(
                            'Malformed JSON, or not an object {"instances": N} with an integer N >= 1'
                        ),
                        **unauthorized,
                        "404": _error("Unknown stage"),
                        "409": _error(
                            "Past the stage's or the runtime's max_instances (the message names "
                            "the limit), the runtime has no launcher to start instances with, or "
                            "the stage is autoscaled (the message names its range)"
                        ),
                        "413": _TOO_LARGE,
                        "415": _UNSUPPORTED,
                    },
                }
            },
            "/api/instances/{instance_id}/drain": {
                "post": {
                    "summary": "Drain an instance: no new groups, finish pinned work, then stop",
                    "description": "Lowers its stage's target by one.",
                    **secured,
                    "parameters": [
                        {
                            "name": "instance_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "integer", "minimum": 0},
                        }
                    ],
                    "responses": {
                        "202": _json(
                            {
                                "type": "object",
                                "required": ["instance", "state"],
                                "properties": {
                                    "instance": {"type": "integer"},
                                    "state": {"type": "string"},
                                },
                            },
                            "Draining has begun (or the instance had already ended)",
                        ),
                        **unauthorized,
                        "404": _error("Unknown instance"),
                        "409": _error(
                            "The last instance of its stage (scale the stage up first), or one "
                            "of the fewest an autoscaled stage keeps"
                        ),
                        "413": _TOO_LARGE,
                    },
                }
            },
            "/v1/pipelines/{name}/requests": {
                "post": {
                    "summary": "Submit one request and stream its results back",
                    "description": (
                        "By default the response is an SSE stream of `accepted`, `result`... "
                        "and then `done` or `error` events. With `?stream=false` or "
                        "`Accept: application/json` the response is one JSON object once the "
                        "request has finished. Closing the connection cancels the request. "
                        "A deadline (`timeout` or `X-Alto-Timeout`, seconds; default: the "
                        "deployment's `[runtime] request_timeout`) ends the request with an "
                        '`error` event saying "deadline exceeded". A W3C `traceparent` '
                        "header makes the request's trace continue the caller's (its sampled "
                        "flag decides whether it is traced); a traced request's answer carries "
                        "a `traceparent` with its trace id, and `GET /api/requests/{id}` has "
                        "its timeline."
                    ),
                    **secured,
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "description": "the pipeline this runtime serves",
                            "schema": {"type": "string", "enum": [stats.pipeline]},
                        },
                        {
                            "name": "stream",
                            "in": "query",
                            "required": False,
                            "description": "false: one JSON answer instead of SSE",
                            "schema": {"enum": list(STREAM_FLAGS), "default": "true"},
                        },
                        {
                            "name": "timeout",
                            "in": "query",
                            "required": False,
                            "description": f"the request's deadline in seconds (or the {TIMEOUT_HEADER} header; not both)",
                            "schema": _SECONDS_SCHEMA,
                        },
                        {
                            "name": TIMEOUT_HEADER,
                            "in": "header",
                            "required": False,
                            "description": "the request's deadline in seconds (or the timeout query parameter; not both)",
                            "schema": _SECONDS_SCHEMA,
                        },
                        {
                            "name": "traceparent",
                            "in": "header",
                            "required": False,
                            "description": "W3C Trace Context: the caller's trace, which the request's continues",
                            "schema": _TRACEPARENT_SCHEMA,
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "description": body_description,
                        "content": {"application/json": {"schema": body_schema}},
                    },
                    "responses": {
                        "200": {
                            "description": "Results, streamed or collected",
                            "headers": {
                                "X-Request-Id": {
                                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                                    "description": "the request's id (DELETE /v1/requests/{id} cancels it)",
                                },
                                "traceparent": {
                                    "schema": _TRACEPARENT_SCHEMA,
                                    "description": "traced requests: the request's trace id",
                                },
                            },
                            "content": {
                                **_sse(_REQUEST_EVENTS, "")["content"],
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["request_id", "status", "results"],
                                        "properties": {
                                            "request_id": {"type": "integer"},
                                            "status": {"enum": ["done", "error"]},
                                            "error": {"type": "string"},
                                            "latency_s": {"type": "number"},
                                            "results": {
                                                "type": "array",
                                                "items": {"$ref": "#/components/schemas/Result"},
                                            },
                                        },
                                    }
                                },
                            },
                        },
                        "400": _error(
                            "Malformed JSON, input that does not fit the input message, a "
                            "stream flag that is not a boolean, a timeout out of range, or a "
                            "malformed traceparent"
                        ),
                        **unauthorized,
                        "404": _error("This runtime serves another pipeline"),
                        "413": _error(
                            "The body is larger than 16 MiB, or the input does not fit one frame"
                        ),
                        "415": _UNSUPPORTED,
                        "429": _error(
                            "Overloaded: past max_inflight_requests",
                            {
                                "Retry-After": {
                                    "schema": {"type": "integer", "minimum": 1},
                                    "description": "seconds to wait before retrying",
                                }
                            },
                        ),
                    },
                }
            },
            "/v1/requests/{request_id}": {
                "delete": {
                    "summary": "Cancel a running request",
                    "description": (
                        "The request ends with an error saying it was cancelled (its client "
                        "gets that as its `error` event), its queued work is dropped and the "
                        "instances holding its inputs are told to stop."
                    ),
                    **secured,
                    "parameters": [_REQUEST_ID_PATH],
                    "responses": {
                        "202": _json(
                            {
                                "type": "object",
                                "required": ["request_id", "state"],
                                "properties": {
                                    "request_id": _REQUEST_ID,
                                    "state": {"enum": _REQUEST_STATES},
                                },
                            },
                            "Cancelled",
                        ),
                        **unauthorized,
                        "404": _error("Unknown, or already ended"),
                    },
                }
            },
            "/api/requests": {
                "get": {
                    "summary": "Finished requests: the most recent, or the slowest",
                    "description": (
                        "Whichever door they came through (HTTP, socket clients, in-process). "
                        "The runtime remembers the last 1024 finished requests."
                    ),
                    "parameters": [
                        {
                            "name": "order",
                            "in": "query",
                            "required": False,
                            "description": "recent: newest first; slowest: slowest first",
                            "schema": {"enum": list(REQUEST_ORDERS), "default": REQUEST_ORDERS[0]},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_REQUESTS_LISTED,
                                "default": 50,
                            },
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["order", "requests"],
                                "properties": {
                                    "order": {"enum": list(REQUEST_ORDERS)},
                                    "requests": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/RequestSummary"},
                                    },
                                },
                            },
                            "The requests, in the order asked for",
                        ),
                        "400": _error("An order or limit outside what is allowed"),
                    },
                }
            },
            "/api/requests/{request_id}": {
                "get": {
                    "summary": "One request's timeline: its state, timings and trace",
                    "description": (
                        "Running, recent and slowest requests are known. `trace` is null "
                        "when the request was not sampled (`[runtime] trace_sample_rate`)."
                    ),
                    "parameters": [_REQUEST_ID_PATH],
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/Timeline"}, "The timeline"),
                        "404": _error("Unknown: never admitted, or forgotten"),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness: the process serves HTTP (never behind the token)",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["status"],
                                "properties": {"status": {"const": "ok"}},
                            },
                            "Alive",
                        )
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: every stage has a ready instance (never behind the token)",
                    "responses": {
                        "200": _json(
                            _READINESS, "Ready: a request admitted now can pass every stage"
                        ),
                        "503": _json(
                            _READINESS,
                            "Not ready: `stages` names each stage without a ready instance and why",
                        ),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
                }
            },
            "/": {
                "get": {
                    "summary": "The dashboard",
                    "responses": {
                        "200": {
                            "description": "the dashboard's page",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        },
                        "404": _error("This server has no dashboard directory"),
                    },
                }
            },
            "/dashboard/{filename}": {
                "get": {
                    "summary": "The dashboard's static files",
                    "description": "Only files inside the dashboard directory are served.",
                    "parameters": [
                        {
                            "name": "filename",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "the file",
                            "content": {
                                "text/html": {"schema": {"type": "string"}},
                                "text/css": {"schema": {"type": "string"}},
                                "text/javascript": {"schema": {"type": "string"}},
                                "application/octet-stream": {"schema": {"type": "string"}},
                            },
                        },
                        "404": _error("No such file in the dashboard directory"),
                    },
                }
            },
        },
    }
