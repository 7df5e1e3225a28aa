"""A small OpenAI-compatible completions server that fails on purpose (stdlib only).

Run as a process by tests/test_engine_retries.py. It speaks the streaming protocol that
vLLM, SGLang and llama.cpp's server speak: ``POST /v1/completions`` with
``"stream": true`` answers ``data: {json}`` Server-Sent Events, one word each, ended by
``data: [DONE]`` (chunked transfer encoding, HTTP/1.1 keep-alive); ``GET /v1/models`` names
the model. Its first ``--fail-first`` completion calls fail the way ``--failure`` says:

- ``503`` / ``429``: that status with an OpenAI-style error body, and a ``Retry-After``
  header when ``--retry-after`` is given (sent as is: seconds or an HTTP date);
- ``reset``: the request is read, then the connection is reset (RST, no answer at all).

A request without a string ``prompt`` or with ``max_tokens`` below 1 gets 400, as from a
real server. ``--die-after-first-token`` makes the process exit right after it has sent the
first event of a stream, as a crashing server would.

It prints ``port N`` once listening (it binds 127.0.0.1 port 0, so there is no race for a
free port), then ``call N`` for every completion call before answering it, so that a test
counts the calls the server saw, even after it died.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ANSWER = ["Paris", " is", " the", " capital", " of", " France", "."]


class _State:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.calls = 0
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client's pool reuses connections
    server: FlakyServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # stdout carries the call lines the tests count

    def _send_json(
        self, status: int, payload: object, headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        error = {"message": message, "type": "server_error", "code": status}
        self._send_json(status, {"error": error}, headers)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": "flaky"}]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/v1/completions":
            self._error(404, f"no route {self.path}")
            return
        state = self.server.state
        options = state.options
        with state.lock:
            state.calls += 1
            call = state.calls
        print(f"call {call}", flush=True)
        if call <= options.fail_first:
            if options.failure == "reset":
                # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()
                self.close_connection = True
                return
            headers = {}
            if options.retry_after is not None:
                headers["Retry-After"] = options.retry_after
            self._error(int(options.failure), f"failing call {call} on purpose", headers)
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._error(400, "the body is not JSON")
            return
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(body.get("prompt"), str):
            self._error(400, "prompt must be a string")
            return
        if not isinstance(max_tokens, int) or max_tokens < 1:
            self._error(400, f"max_tokens must be at least 1, got {max_tokens!r}")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for word in ANSWER[:max_tokens]:
            event = {"object": "text_completion", "choices": [{"index": 0, "text": word}]}
            self._send_chunk(f"data: {json.dumps(event)}\n\n")
            if options.die_after_first_token:
                os._exit(3)  # no [DONE], no last chunk: the process is gone
        self._send_chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")


class FlakyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, options: argparse.Namespace) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = _State(options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fail-first", type=int, default=0, metavar="N")
    parser.add_argument("--failure", choices=["503", "429", "500", "reset"], default="503")
    parser.add_argument("--retry-after", default=None, metavar="VALUE")
    parser.add_argument("--die-after-first-token", action="store_true")
    server = FlakyServer(parser.parse_args())
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
