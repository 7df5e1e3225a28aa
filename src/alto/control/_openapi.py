"""The OpenAPI 3.1 description served at ``GET /openapi.json`` (written by hand)."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ERROR, description)


_UNAUTHORIZED = _error(
    "No bearer token, or the wrong one, while the server is configured with a token. "
    "The response carries `WWW-Authenticate: Bearer`."
)


def openapi_document(version: str = "0.1.0") -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "alto control plane",
            "version": version,
            "description": (
                "Status, live statistics, scaling and request ingress of one alto runtime. "
                "Mutating endpoints need `Authorization: Bearer <token>` when the server was "
                'started with a token. Errors are JSON objects `{"error": message}`.'
            ),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
                "Stage": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "scheduler": {"type": "string"},
                        "stateful": {"type": "boolean"},
                        "aggregate_level": {"type": ["integer", "null"]},
                        "fanout": {"type": "boolean"},
                        "inputs": {"type": "array", "items": {"type": "string"}},
                        "outputs": {"type": "array", "items": {"type": "string"}},
                        "instances": {"type": "array", "items": {"type": "integer"}},
                        "target_instances": {"type": "integer"},
                        "frames_processed": {"type": "integer"},
                        "errors": {"type": "integer"},
                    },
                },
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
                    },
                },
                "Instance": {
                    "type": "object",
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
                    },
                },
                "Result": {
                    "type": "object",
                    "properties": {
                        "request_id": {"type": "integer"},
                        "queue": {"type": "string"},
                        "key_path": {"type": "array", "items": {"type": "integer"}},
                        "output": {"description": "the JSON form of the queue's protobuf message"},
                    },
                },
            },
        },
        "paths": {
            "/api/pipeline": {
                "get": {
                    "summary": "Stages, queues, edges with their routing policy, and instances",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
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
                        "Each event carries per-instance queue depth, rates (frames/s, "
                        "requests/s) and ingress latency p50/p99. A new client gets the current "
                        "state at once; a slow client skips to the latest event."
                    ),
                    "responses": {
                        "200": {
                            "description": "an endless event stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/api/stages/{stage}/scale": {
                "post": {
                    "summary": "Scale a stage to a number of instances",
                    "security": [{"bearer": []}],
                    "parameters": [
                        {
                            "name": "stage",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["instances"],
                                    "properties": {"instances": {"type": "integer", "minimum": 1}},
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json(
                            {"$ref": "#/components/schemas/Stage"}, "The stage after scaling"
                        ),
                        "400": _error("Malformed JSON, or a count that is not an integer >= 1"),
                        "401": _UNAUTHORIZED,
                        "404": _error("Unknown stage"),
                    },
                }
            },
            "/api/instances/{instance_id}/drain": {
                "post": {
                    "summary": "Drain an instance: no new groups, finish pinned work, then stop",
                    "security": [{"bearer": []}],
                    "parameters": [
                        {
                            "name": "instance_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "integer"},
                        }
                    ],
                    "responses": {
                        "202": _json({"type": "object"}, "Draining has begun"),
                        "401": _UNAUTHORIZED,
                        "404": _error("Unknown instance"),
                    },
                }
            },
            "/v1/pipelines/{name}/requests": {
                "post": {
                    "summary": "Submit one request and stream its results back",
                    "description": (
                        "The body is the JSON form of the pipeline's input protobuf message. By "
                        "default the response is an SSE stream of `accepted`, `result`... and "
                        "then `done` or `error` events. With `?stream=false` or "
                        "`Accept: application/json` the response is one JSON object once the "
                        "request has finished."
                    ),
                    "security": [{"bearer": []}],
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "stream",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "boolean", "default": True},
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {}}},
                    },
                    "responses": {
                        "200": {
                            "description": "Results, streamed or collected",
                            "content": {
                                "text/event-stream": {"schema": {"type": "string"}},
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "request_id": {"type": "integer"},
                                            "status": {"enum": ["done", "error"]},
                                            "error": {"type": "string"},
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
                            "Malformed JSON, or input that does not fit the input message"
                        ),
                        "401": _UNAUTHORIZED,
                        "404": _error("This runtime serves another pipeline"),
                        "429": {
                            "description": "Overloaded: retry after the `Retry-After` seconds",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                            "content": {"application/json": {"schema": _ERROR}},
                        },
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
        },
    }
