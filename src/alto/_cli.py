"""The ``alto`` command line.

alto serve PIPELINE.toml [--deploy DEPLOY.toml] [--tcp HOST:PORT] [--http HOST:PORT | --no-http] [--token T]
           [--launcher NAME] [--ray-address ADDR] [--tls-cert PEM --tls-key PEM] [--insecure-tcp]
           [--otlp-endpoint URL | --trace-file PATH] [--sse-keepalive SECONDS]
alto validate PIPELINE.toml [--deploy DEPLOY.toml]   (check both files and their imports; serve nothing)
alto submit PIPELINE [JSON ...] [--file FILE.jsonl] [--concurrency N] [--timeout SECONDS]
alto worker --pipeline PIPELINE.toml --stage NAME --connect HOST:PORT --token T [--tls-ca PEM]
alto status [--json] | top [--json] | scale STAGE N | drain ID | trace ID [--json] | cancel ID
     (talk to the HTTP control plane)
alto --version

Exit codes: 0 done; 1 a request failed or the server refused (HTTP error); 2 bad input, a
configuration error or no server to talk to; 130 interrupted; 141 (128 + SIGPIPE) the
reader of stdout went away (``alto status | head``), which ends the command quietly, as
coreutils' commands end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO, cast

import trio

from ._errors import AltoError

DEFAULT_HTTP = "127.0.0.1:8470"

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Bounds of the numbers the command line takes: a typo of three zeros is an error.
MAX_CONCURRENCY = 10_000  # requests one `alto submit` keeps in flight
MAX_SQUAD = 1_000  # SQuAD questions one `alto submit --squad` sends
MAX_ITERATIONS = 1_000_000  # `alto top` updates (four a second: about three days)
MAX_INSTANCE_ID = (1 << 63) - 1
MAX_REQUEST_ID = (1 << 63) - 1


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high``, else an error naming the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer in {low}..{high}, not {text!r}"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, not {value}")
        return value

    return parse


def _seconds_in(high: float, what: str) -> Callable[[str], float]:
    """An argparse type: seconds in ``(0, high]``, else an error naming the range."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be a number of seconds in (0, {high:g}], not {text!r}"
            ) from None
        if not 0 < value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(
                f"{what} must be a number of seconds in (0, {high:g}], not {text}"
            )
        return value

    return parse


def _keepalive(text: str) -> float:
    """An argparse type: ``--sse-keepalive`` seconds, within the control plane's bounds."""
    from .control._stream import MAX_KEEPALIVE_S

    return _seconds_in(MAX_KEEPALIVE_S, "--sse-keepalive")(text)


def _pipeline_name(arg: str) -> str:
    """A pipeline name, or the name inside a pipeline file."""
    if arg.endswith(".toml") or Path(arg).is_file():
        from ._config import load_pipeline

        return load_pipeline(arg).name
    return arg


def _cmd_serve(args: argparse.Namespace) -> int:
    from ._serve import ServeInfo, serve

    def ready(info: ServeInfo) -> None:
        print(f"alto: pipeline {info.pipeline!r} is ready", file=sys.stderr)
        if info.http_url:
            print(f"alto: dashboard and API at {info.http_url}/", file=sys.stderr)
        print(f"alto: submit with: alto submit {info.pipeline} '<json input>'", file=sys.stderr)

    launcher = args.launcher
    launcher_options = {}
    if args.ray_address:
        launcher = launcher or "ray"  # an address of a Ray cluster means the Ray launcher
        launcher_options["address"] = args.ray_address
    stderr = sys.stderr
    tail = _OutputTail(stderr)
    sys.stderr = cast(TextIO, tail)
    try:
        trio.run(
            lambda: serve(
                args.pipeline,
                args.deploy,
                tcp=args.tcp,
                http=None if args.no_http else args.http,
                token=args.token,
                on_ready=ready,
                launcher=launcher,
                launcher_options=launcher_options,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                tls_ca=args.tls_ca,
                insecure_tcp=args.insecure_tcp,
                otlp_endpoint=args.otlp_endpoint,
                trace_file=args.trace_file,
                sse_keepalive=args.sse_keepalive,
            )
        )
    except (AltoError, BaseExceptionGroup) as exc:
        failed = tail.explain(exc)
        if failed is None:
            raise
        raise failed from exc
    finally:
        sys.stderr = stderr
    return 0


class _OutputTail:
    """``sys.stderr`` for ``alto serve``: passes everything through, and remembers the last
    non-empty line each instance printed (the local launcher relays instance output as
    ``[stage/N] line``), so that when an instance fails to start, the one line that ends
    ``alto serve`` can say why: a stage's ``setup()`` that raises prints a traceback whose
    last line is the exception."""

    _LINE = re.compile(rb"^\[([^\]\s/]+/[0-9]+)\] (.*\S)")
    _FAILED = re.compile(r"^instance (\S+/[0-9]+) failed to start: ")

    def __init__(self, stderr: TextIO) -> None:
        self._stderr = stderr
        self.buffer = _TailBuffer(stderr.buffer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stderr, name)

    def write(self, text: str) -> int:
        return self._stderr.write(text)

    def explain(self, exc: BaseException) -> AltoError | None:
        """``exc`` with the failed instance's last output line appended, if it is an
        instance failing to start (alone or in an exception group) that printed one."""
        todo, leaves = [exc], []
        while todo:
            e = todo.pop(0)
            if isinstance(e, BaseExceptionGroup):
                todo.extend(e.exceptions)
            else:
                leaves.append(e)
        for leaf in leaves:
            if "setup failed:" in str(leaf):
                return None  # the instance said why itself (its setup() raised)
            found = self._FAILED.match(str(leaf)) if isinstance(leaf, AltoError) else None
            last = self.buffer.last.get(found[1]) if found else None
            if last is not None:
                return AltoError(f"{leaf}; its last output: {last}")
        return None


class _TailBuffer:
    """The binary stream under :class:`_OutputTail` (what the launcher writes to)."""

    MAX_LINE = 1000  # characters of a remembered line

    def __init__(self, buffer: Any) -> None:
        self._buffer = buffer
        self.last: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._buffer, name)

    def write(self, data: bytes) -> int:
        for line in bytes(data).split(b"\n"):
            found = _OutputTail._LINE.match(line)
            if found:
                text = found[2].decode("utf-8", "replace")
                self.last[found[1].decode("ascii", "replace")] = text[: self.MAX_LINE]
        written: int = self._buffer.write(data)
        return written


def _cmd_validate(args: argparse.Namespace) -> int:
    """Check the pipeline and deployment files and import what they name, as ``alto
    serve`` does before it spawns anything; print one line of summary."""
    from ._config import check_imports, load_deployment, load_pipeline

    pipeline = load_pipeline(args.pipeline)
    deployment = load_deployment(args.deploy, pipeline)
    try:
        check_imports(pipeline)
    except AltoError:
        raise
    except Exception as exc:  # an entry's constructor may raise anything: still one line
        raise AltoError(
            f"{pipeline.path}: building the stages' entries failed: {type(exc).__name__}: {exc}"
        ) from exc
    instances = ", ".join(f"{name} {deployment.instances(name)}" for name in pipeline.stages)
    n_stages, n_queues = len(pipeline.stages), len(pipeline.queues)
    print(
        f"ok: pipeline {pipeline.name!r}: {n_stages} stage{'s' if n_stages != 1 else ''}, "
        f"{n_queues} queue{'s' if n_queues != 1 else ''}; instances: {instances} "
        f"({pipeline.path}, {deployment.path})"
    )
    return 0


def _inputs(args: argparse.Namespace) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for text in args.inputs:
        items.append(json.loads(text))
    if args.file:
        with open(args.file) as f:
            items.extend(json.loads(line) for line in f if line.strip())
    if args.squad:
        from .retrieval import load_questions

        qs = load_questions()[::97][: args.squad]  # spread over the dev set's articles
        items.extend({"id": q.id, "question": q.question, "gold_pid": q.gold_pid} for q in qs)
    if not items:
        raise AltoError("nothing to submit: give JSON inputs or --file")
    return items


def _pretty(out: Any, width: int = 150) -> str:
    """One line for a result: its text-like fields, passages as 'title (score)'."""
    if not isinstance(out, dict):
        return str(out)[:width]
    parts = []
    for k, v in out.items():
        if k == "passages" and isinstance(v, list):
            parts.append(
                "evidence: " + "; ".join(f"{p.get('id', '?')} ({p.get('score', 0):.2f})" for p in v)
            )
        elif k not in ("questionId", "embedding"):
            parts.append(f"{k}: {v}")
    text = " | ".join(parts)
    return text if len(text) <= width else text[: width - 3] + "..."


def _cmd_submit(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from ._client import open_client

    name = _pipeline_name(args.pipeline)
    inputs = _inputs(args)
    failures = 0

    async def main() -> None:
        nonlocal failures
        async with open_client(
            name, address=args.address, token=args.token, tls_ca=args.tls_ca
        ) as client:
            typ = client.message_type(client.input_queue)
            limiter = trio.CapacityLimiter(args.concurrency)
            messages = []
            for i, data in enumerate(inputs):  # all inputs are checked before any is sent
                try:
                    messages.append(json_format.ParseDict(data, typ()))
                except (json_format.ParseError, TypeError, ValueError) as exc:
                    raise AltoError(
                        f"input {i} does not fit {typ.DESCRIPTOR.full_name}: {exc}"
                    ) from exc

            async def one(i: int, msg: Any) -> None:
                nonlocal failures
                async with limiter:
                    t0 = trio.current_time()
                    try:
                        async for r in client.submit(msg, timeout=args.timeout):
                            out = json_format.MessageToDict(r.message)
                            t = trio.current_time() - t0
                            if args.pretty:
                                print(
                                    f"{t:7.2f}s  request {r.request_id:<3} {r.queue:<12} {list(r.key_path)!s:<12} {_pretty(out)}",
                                    flush=True,
                                )
                            else:
                                print(
                                    json.dumps(
                                        {
                                            "input": i,
                                            "request": r.request_id,
                                            "t": round(t, 3),
                                            "queue": r.queue,
                                            "key_path": list(r.key_path),
                                            "output": out,
                                        }
                                    ),
                                    flush=True,
                                )
                    except AltoError as exc:
                        failures += 1
                        print(json.dumps({"input": i, "error": str(exc)}), flush=True)
                    else:
                        t = trio.current_time() - t0
                        if args.pretty:
                            print(f"{t:7.2f}s  input {i} done", flush=True)
                        else:
                            print(
                                json.dumps({"input": i, "done": True, "t": round(t, 3)}), flush=True
                            )

            async with trio.open_nursery() as n:
                for i, msg in enumerate(messages):
                    n.start_soon(one, i, msg)

    trio.run(main)
    return 1 if failures else 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from . import _worker

    os.environ.update(ALTO_PIPELINE=args.pipeline, ALTO_STAGE=args.stage, ALTO_ADDRESS=args.connect)
    token = args.token or os.environ.get("ALTO_TOKEN")
    if not token:
        raise AltoError("a remote instance needs the runtime's token: --token or ALTO_TOKEN")
    os.environ["ALTO_TOKEN"] = token
    if args.tls_ca:
        os.environ["ALTO_TLS_CA"] = args.tls_ca  # read by the worker's connect()
    os.environ.pop("ALTO_INSTANCE", None)
    _worker.main()
    return 0


def _http_url(args: argparse.Namespace) -> str:
    url: str = args.url or os.environ.get("ALTO_URL") or f"http://{DEFAULT_HTTP}"
    return url.rstrip("/")


def _cmd_status(args: argparse.Namespace) -> int:
    from .control import _cli as c

    return c.status(_http_url(args), args.token, json_output=args.json)


def _cmd_scale(args: argparse.Namespace) -> int:
    from .control import _cli as c

    return c.scale(_http_url(args), args.stage, args.instances, args.token)


def _cmd_drain(args: argparse.Namespace) -> int:
    from .control import _cli as c

    return c.drain(_http_url(args), args.instance, args.token)


def _cmd_top(args: argparse.Namespace) -> int:
    from .control import _cli as c

    return c.top(_http_url(args), args.token, args.iterations, json_output=args.json)


def _cmd_trace(args: argparse.Namespace) -> int:
    from .control import _cli as c

    return c.trace(_http_url(args), args.request, args.token, json_output=args.json)


def _cmd_cancel(args: argparse.Namespace) -> int:
    from .control import _cli as c

    return c.cancel(_http_url(args), args.request, args.token)


class _Parser(argparse.ArgumentParser):
    """A command-line mistake is one line, as every other error of ``alto`` is: what was
    wrong and what is allowed, and where the usage is (not the usage itself)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from ._config import MAX_INSTANCES, MAX_TIMEOUT_SECONDS

    p = _Parser(
        prog="alto", description="Serve compound AI pipelines with partial-output streaming."
    )
    p.add_argument("--version", action="version", version=f"alto {__version__}")
    p.add_argument(
        "--log-level",
        default=os.environ.get("ALTO_LOG_LEVEL", "INFO"),
        help=f"one of {', '.join(LOG_LEVELS)} (default: ALTO_LOG_LEVEL, else INFO)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve", help="run a pipeline: the runtime, its instances and the HTTP control plane"
    )
    s.add_argument("pipeline", help="pipeline file (TOML)")
    s.add_argument("--deploy", help="deployment file (TOML): instances per stage, runtime limits")
    s.add_argument(
        "--tcp", help="also accept instances and clients on HOST:PORT (needs a token off loopback)"
    )
    s.add_argument(
        "--http", default=DEFAULT_HTTP, help=f"control plane address (default {DEFAULT_HTTP})"
    )
    s.add_argument("--no-http", action="store_true", help="do not start the control plane")
    s.add_argument(
        "--token",
        default=os.environ.get("ALTO_TOKEN"),
        help="shared token (default: ALTO_TOKEN, else random)",
    )
    s.add_argument(
        "--launcher",
        help="who starts the instances: a name in the alto.launchers group, e.g. local or ray "
        "(default: the deployment's [runtime] launcher, else local)",
    )
    s.add_argument(
        "--ray-address",
        help="the Ray cluster to start instances on (implies --launcher ray; "
        "default: the deployment's [launcher] address, else a local cluster)",
    )
    s.add_argument("--tls-cert", help="PEM certificate chain: the --tcp listener speaks TLS")
    s.add_argument("--tls-key", help="PEM private key of --tls-cert")
    s.add_argument(
        "--tls-ca",
        help="PEM file that launched instances trust (default: --tls-cert itself, pinned)",
    )
    s.add_argument(
        "--insecure-tcp",
        action="store_true",
        help="allow plain TCP (no TLS) on a non-loopback --tcp address",
    )
    s.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="export request traces over OTLP/HTTP to this collector, e.g. "
        "http://127.0.0.1:4318 (default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
        "OTEL_EXPORTER_OTLP_ENDPOINT, else none)",
    )
    s.add_argument(
        "--trace-file",
        metavar="PATH",
        help="append request traces to this file, one OpenTelemetry span per line as JSON "
        "(default: ALTO_TRACE_FILE, else none)",
    )
    s.add_argument(
        "--sse-keepalive",
        type=_keepalive,
        default=None,
        metavar="SECONDS",
        # The numbers are alto.control._stream's DEFAULT_KEEPALIVE_S and MAX_KEEPALIVE_S,
        # written out: importing the control plane here would slow every command.
        help="SSE streams send a comment after this many silent seconds, for proxies with "
        "idle timeouts (default 15, at most 600)",
    )
    s.set_defaults(fn=_cmd_serve)

    s = sub.add_parser(
        "validate",
        help="check a pipeline and deployment file and import their entries, without serving",
    )
    s.add_argument("pipeline", help="pipeline file (TOML)")
    s.add_argument("--deploy", help="deployment file (TOML; default: one instance per stage)")
    s.set_defaults(fn=_cmd_validate)

    s = sub.add_parser("submit", help="submit requests and stream their results as JSON lines")
    s.add_argument("pipeline", help="pipeline name or file")
    s.add_argument("inputs", nargs="*", help="JSON inputs (the input queue's message as JSON)")
    s.add_argument("--file", help="a JSON-lines file of inputs")
    s.add_argument(
        "--squad",
        type=_int_in(0, MAX_SQUAD),
        default=0,
        metavar="N",
        help="also submit N SQuAD dev questions (FacTool's input type)",
    )
    s.add_argument(
        "--pretty", action="store_true", help="one readable line per result instead of JSON"
    )
    s.add_argument(
        "--concurrency",
        type=_int_in(1, MAX_CONCURRENCY),
        default=16,
        help="requests in flight at once (default 16)",
    )
    s.add_argument(
        "--timeout",
        type=_seconds_in(MAX_TIMEOUT_SECONDS, "--timeout"),
        default=None,
        metavar="SECONDS",
        help="each request's deadline: past it the request fails with 'deadline exceeded' "
        "and its work is cancelled (default: the deployment's [runtime] request_timeout)",
    )
    s.add_argument("--address", help="unix:/path or HOST:PORT (default: the discovery file)")
    s.add_argument("--token", default=None)
    s.add_argument(
        "--tls-ca", help="PEM file of the CA to trust: HOST:PORT over TLS (default ALTO_TLS_CA)"
    )
    s.set_defaults(fn=_cmd_submit)

    s = sub.add_parser("worker", help="run one stage instance that connects to a runtime over TCP")
    s.add_argument("--pipeline", required=True)
    s.add_argument("--stage", required=True)
    s.add_argument("--connect", required=True, help="HOST:PORT of alto serve --tcp")
    s.add_argument("--token", default=None)
    s.add_argument(
        "--tls-ca", help="PEM file of the CA to trust: connect over TLS (default ALTO_TLS_CA)"
    )
    s.set_defaults(fn=_cmd_worker)

    for name, fn, helptext in (
        ("status", _cmd_status, "table of stages and instances"),
        ("top", _cmd_top, "live view of queue depths"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument(
            "--url", help=f"control plane URL (default ALTO_URL or http://{DEFAULT_HTTP})"
        )
        s.add_argument("--token", default=os.environ.get("ALTO_TOKEN"))
        s.add_argument(
            "--json",
            action="store_true",
            help="machine-readable: one JSON object per line"
            + (" (one per update)" if name == "top" else ""),
        )
        if name == "top":
            s.add_argument(
                "--iterations",
                type=_int_in(1, MAX_ITERATIONS),
                default=None,
                help="stop after N updates",
            )
        s.set_defaults(fn=fn)
    s = sub.add_parser("scale", help="set a stage's instance count")
    s.add_argument("stage")
    s.add_argument("instances", type=_int_in(1, MAX_INSTANCES))
    s.add_argument("--url")
    s.add_argument("--token", default=os.environ.get("ALTO_TOKEN"))
    s.set_defaults(fn=_cmd_scale)
    s = sub.add_parser("drain", help="drain one instance (finish its pinned groups, then stop it)")
    s.add_argument("instance", type=_int_in(0, MAX_INSTANCE_ID))
    s.add_argument("--url")
    s.add_argument("--token", default=os.environ.get("ALTO_TOKEN"))
    s.set_defaults(fn=_cmd_drain)
    s = sub.add_parser(
        "trace",
        help="a request's timeline: its stages and spans, the partial outputs relayed, LM usage",
    )
    s.add_argument("request", type=_int_in(0, MAX_REQUEST_ID), help="the request's id")
    s.add_argument("--url", help=f"control plane URL (default ALTO_URL or http://{DEFAULT_HTTP})")
    s.add_argument("--token", default=os.environ.get("ALTO_TOKEN"))
    s.add_argument("--json", action="store_true", help="the raw timeline as one line of JSON")
    s.set_defaults(fn=_cmd_trace)
    s = sub.add_parser("cancel", help="cancel a running request")
    s.add_argument("request", type=_int_in(0, MAX_REQUEST_ID), help="the request's id")
    s.add_argument("--url", help=f"control plane URL (default ALTO_URL or http://{DEFAULT_HTTP})")
    s.add_argument("--token", default=os.environ.get("ALTO_TOKEN"))
    s.set_defaults(fn=_cmd_cancel)
    return p


def _leaves(group: BaseExceptionGroup[AltoError]) -> list[AltoError]:
    out: list[AltoError] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _stdout_gone() -> int:
    """The reader of stdout went away (``alto status | head``): end quietly.

    Python ignores SIGPIPE, so a write to the closed pipe raises BrokenPipeError; restoring
    the default action instead would also let a write to a closed socket kill ``alto
    serve``. This is the recipe of Python's ``signal`` documentation ("Note on SIGPIPE"):
    point stdout at /dev/null, so that the interpreter's last flush at exit does not raise
    again, and exit with the status a shell reports for a command that SIGPIPE ended.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file descriptor (captured, closed)
        pass
    return 128 + signal.SIGPIPE


def _run(args: argparse.Namespace) -> int:
    try:
        code: int = args.fn(args)
    except AltoError as exc:
        print(f"alto: error: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:  # raised inside a nursery (Trio wraps errors)
        if group.subgroup(BrokenPipeError) is not None:
            return _stdout_gone()
        alto_errors, rest = group.split(AltoError)
        if rest is not None or alto_errors is None:
            raise
        first = _leaves(alto_errors)[0]
        print(f"alto: error: {first}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    try:
        sys.stdout.flush()  # what is still buffered meets the closed pipe here, not at exit
    except BrokenPipeError:
        return _stdout_gone()
    return code


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level.upper() not in LOG_LEVELS:
        parser.error(
            f"--log-level (or ALTO_LOG_LEVEL) must be one of {', '.join(LOG_LEVELS)}, "
            f"not {args.log_level!r}"
        )
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP call is noise here
    try:
        code = _run(args)
    except BrokenPipeError:
        code = _stdout_gone()
    sys.exit(code)
