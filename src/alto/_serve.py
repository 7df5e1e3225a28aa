"""``alto serve``: the runtime, the launcher and the control plane in one Trio process.

Start-up order: read and validate both files; create a private directory (mode 0700) with
the runtime's UNIX socket; listen (and on TCP with ``--tcp``); spawn every instance; wait
until all have registered; start the HTTP control plane; write the discovery file that
``alto submit`` and :class:`alto.Client` read. Ctrl-C or SIGTERM cancels the nursery: the
instances are terminated, the socket directory and the discovery file are removed.

The runtime authenticates every connection with a token. Local instances get it through
their environment; remote instances (``alto worker --connect HOST:PORT``) and clients read
it from ``--token``/``ALTO_TOKEN`` or from the discovery file (mode 0600).

Instances are started by a launcher plugin (``alto.dataplane._launcher``): ``--launcher
NAME`` or the deployment's ``[runtime] launcher`` (default ``local``), with the
deployment's ``[launcher]`` options. A launcher whose instances run on other machines
(``ray``) gets a TCP listener on ``127.0.0.1:0`` when ``--tcp`` is not given.

TCP off loopback: a token is required, and the connections must be TLS (``--tls-cert``
and ``--tls-key``, or ``[tls]`` in the deployment file) unless ``--insecure-tcp`` says
that plain TCP is wanted (logged as a warning): the token and every payload would cross
the network in the clear.

Request traces leave the process only when asked: ``--otlp-endpoint URL`` (OTLP/HTTP) or
``--trace-file PATH`` (JSON lines), or the environment variables
:func:`alto.dataplane._otel.exporter_from_options` reads. The exporter is flushed and shut
down when serving ends.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import secrets
import shutil
import signal
import socket as _socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ._artifacts import prepare_artifacts
from ._config import (
    DeploymentConfig,
    PipelineConfig,
    check_imports,
    load_deployment,
    load_pipeline,
)
from ._errors import ConfigError
from .dataplane._launcher import LaunchContext, LauncherClass, check_options, load_launcher
from .dataplane._otel import OTelExport, exporter_from_options
from .dataplane._runtime import Runtime
from .dataplane._tls import server_context

log = logging.getLogger("alto.serve")

__all__ = ["ServeInfo", "discovery_path", "read_discovery", "run_dir", "serve"]


def run_dir() -> Path:
    """Where discovery files live: ``$ALTO_RUN_DIR``, else ``run/`` in alto's cache
    directory (``$ALTO_CACHE_DIR``, else ``$XDG_CACHE_HOME/alto``, else ``~/.cache/alto``).

    Raises :class:`alto._artifacts.ArtifactError` when ``ALTO_CACHE_DIR`` is relative.
    """
    from ._artifacts import cache_dir  # here: this function is all that needs it

    d = os.environ.get("ALTO_RUN_DIR")
    return Path(d) if d else cache_dir() / "run"


def discovery_path(pipeline: str) -> Path:
    return run_dir() / f"{pipeline}.json"


def read_discovery(pipeline: str) -> dict[str, Any]:
    """The discovery file of a running ``alto serve``. Raises RuntimeUnavailable."""
    from ._errors import RuntimeUnavailable

    p = discovery_path(pipeline)
    try:
        data: dict[str, Any] = json.loads(p.read_text())
    except FileNotFoundError:
        raise RuntimeUnavailable(
            f"no running pipeline {pipeline!r} (no {p}); start it with alto serve"
        ) from None
    return data


@dataclass(frozen=True)
class ServeInfo:
    """What ``serve`` reports through ``task_status`` once everything is up."""

    pipeline: str
    socket_path: str
    tcp_address: str | None
    http_url: str | None
    token: str
    runtime: Runtime


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _listen_http(http: str) -> _socket.socket:
    """The control plane's listening socket, bound before anything starts."""
    host, port = parse_hostport(http, "--http")
    family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
    sock = _socket.socket(family, _socket.SOCK_STREAM)
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise _bind_error(exc, host, port, "--http") from exc
    return sock


async def bind_or_explain(sock: trio.socket.SocketType, host: str, port: int, flag: str) -> None:
    """Bind ``sock``; an address in use or not available is a one-line ConfigError
    naming the address and the flag that changes it."""
    try:
        await sock.bind((host, port))
    except OSError as exc:
        raise _bind_error(exc, host, port, flag) from exc


def _bind_error(exc: OSError, host: str, port: int, flag: str) -> ConfigError:
    if exc.errno == errno.EADDRINUSE:
        why = "is already in use (another alto serve?)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = "is not an address of this machine"
    else:
        why = f"cannot be bound: {exc.strerror or exc}"
    return ConfigError(
        "<command line>", flag, f"{host}:{port} {why}; choose another with {flag} HOST:PORT"
    )


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError("<command line>", what, f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(
    pipeline_path: str | Path,
    deploy_path: str | Path | None = None,
    *,
    tcp: str | None = None,
    http: str | None = "127.0.0.1:8470",
    token: str | None = None,
    ready_timeout: float = 120.0,
    write_discovery: bool = True,
    handle_signals: bool = True,
    on_ready: Callable[[ServeInfo], None] | None = None,
    launcher: str | None = None,
    launcher_options: Mapping[str, Any] | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    insecure_tcp: bool = False,
    otlp_endpoint: str | None = None,
    trace_file: str | Path | None = None,
    sse_keepalive: float | None = None,
    task_status: trio.TaskStatus[ServeInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a pipeline until cancelled (or until Ctrl-C / SIGTERM).

    ``launcher`` (default: the deployment's ``[runtime] launcher``) starts the instances,
    with the deployment's ``[launcher]`` options updated by ``launcher_options``.
    ``tls_cert``/``tls_key`` (default: the deployment's ``[tls]``) make the TCP listener
    speak TLS; ``tls_ca`` is the PEM file that the instances a launcher starts trust
    (default: the certificate itself, pinned). ``insecure_tcp`` allows plain TCP off
    loopback. ``otlp_endpoint`` (an http(s) URL) or ``trace_file`` export the traces of
    sampled requests (default: what the environment says, else nothing);
    ``sse_keepalive`` is the control plane's SSE keepalive interval in seconds.

    Raises ConfigError for bad files, addresses, launcher or trace options, PluginError for
    an unknown or broken launcher, AltoError when instances fail to start.
    """
    pipeline = load_pipeline(pipeline_path)
    deployment = load_deployment(deploy_path, pipeline)
    check_imports(pipeline)  # a typo in an entry ends start-up here, in one line
    launcher_name = launcher or deployment.launcher
    launcher_cls = load_launcher(launcher_name)  # an unknown name lists the available ones
    options = check_options(
        launcher_name,
        launcher_cls,
        {**deployment.launcher_options, **(launcher_options or {})},
        deployment.path,
    )
    if tcp is None and launcher_cls.needs_tcp:
        tcp = "127.0.0.1:0"  # instances elsewhere on this machine (a local cluster)
        log.info("launcher %r: instances connect over TCP on 127.0.0.1", launcher_name)
    if deployment.tls is not None and tls_cert is None and tls_key is None:
        tls_cert, tls_key = deployment.tls.cert, deployment.tls.key
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError(
            "<command line>", "--tls-cert", "give both --tls-cert and --tls-key (PEM files)"
        )
    if tls_cert is not None and tcp is None:
        raise ConfigError(
            "<command line>", "--tls-cert", "TLS is for the TCP listener: give --tcp HOST:PORT too"
        )
    user_token = token or os.environ.get("ALTO_TOKEN")
    for flag, addr in (("--tcp", tcp), ("--http", http)):
        if addr and not _is_loopback(parse_hostport(addr, flag)[0]) and not user_token:
            raise ConfigError(
                "<command line>",
                flag,
                f"refusing to listen on non-loopback {addr} without a token (--token or ALTO_TOKEN)",
            )
    ssl_context = None
    tls_ca_pem = None
    if tls_cert is not None and tls_key is not None:
        ssl_context = server_context(tls_cert, tls_key)
        ca_file = tls_ca or tls_cert
        try:
            tls_ca_pem = Path(ca_file).read_text()
        except OSError as exc:
            raise ConfigError(
                "<command line>", "--tls-ca", f"cannot read {ca_file}: {exc}"
            ) from exc
    elif tcp and not _is_loopback(parse_hostport(tcp, "--tcp")[0]):
        if not insecure_tcp:
            raise ConfigError(
                "<command line>",
                "--tcp",
                f"refusing plain TCP on non-loopback {tcp}: the token and every payload would "
                "cross the network in the clear; give --tls-cert and --tls-key (or [tls] in "
                "the deployment file), or --insecure-tcp on a network you trust",
            )
        log.warning(
            "listening on %s over plain TCP (--insecure-tcp): the token and every payload "
            "cross the network unencrypted",
            tcp,
        )
    keepalive = _check_keepalive(sse_keepalive)
    launch = _Launch(launcher_name, launcher_cls, options, ssl_context, tls_ca_pem, keepalive)
    exporter = _trace_exporter(otlp_endpoint, trace_file)
    token = user_token or secrets.token_urlsafe(24)
    sockdir = Path(tempfile.mkdtemp(prefix="alto-"))  # mkdtemp creates it with mode 0700
    sock_path = str(sockdir / "runtime.sock")
    disc = discovery_path(pipeline.name)
    try:
        with contextlib.ExitStack() as stack:
            # Signals are received for the whole life of serve(), shutdown included: a
            # second Ctrl-C (or a SIGTERM forwarded by a supervisor) must not interrupt the
            # orderly stop of the instances.
            signals = (
                stack.enter_context(trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM))
                if handle_signals
                else None
            )
            async with trio.open_nursery() as outer:
                running = trio.CancelScope()
                if signals is not None:
                    outer.start_soon(_watch_signals, signals, running)
                with running:
                    await _serve(
                        pipeline,
                        deployment,
                        sock_path,
                        tcp,
                        http,
                        token,
                        user_token,
                        ready_timeout,
                        write_discovery,
                        on_ready,
                        disc,
                        task_status,
                        launch,
                        exporter,
                    )
                outer.cancel_scope.cancel()
    finally:
        if exporter is not None:
            await _shutdown_exporter(exporter)
        shutil.rmtree(sockdir, ignore_errors=True)
        if write_discovery:
            try:
                data = json.loads(disc.read_text())
                if data.get("pid") == os.getpid():
                    disc.unlink()
            except (OSError, ValueError):
                pass


@dataclass(frozen=True)
class _Launch:
    """The launcher chosen for this serve and the TCP listener's TLS, checked up front."""

    name: str
    cls: LauncherClass
    options: dict[str, Any]
    ssl_context: ssl.SSLContext | None
    tls_ca_pem: str | None  # what launched instances trust
    sse_keepalive: float | None  # the control plane's; None: its default


def _check_keepalive(seconds: float | None) -> float | None:
    if seconds is None:
        return None
    from .control._stream import check_keepalive

    try:
        return check_keepalive(seconds)
    except ValueError as exc:
        raise ConfigError("<command line>", "--sse-keepalive", str(exc)) from exc


def _trace_exporter(otlp_endpoint: str | None, trace_file: str | Path | None) -> OTelExport | None:
    """The exporter of finished traces, or None; a bad endpoint or an unwritable file is a
    ConfigError naming the flag, before anything starts."""
    if otlp_endpoint is not None and trace_file is not None:
        raise ConfigError(
            "<command line>", "--trace-file", "give --otlp-endpoint or --trace-file, not both"
        )
    if otlp_endpoint is not None and not (
        otlp_endpoint.startswith(("http://", "https://")) and len(otlp_endpoint) > 8
    ):
        raise ConfigError(
            "<command line>",
            "--otlp-endpoint",
            f"expected an http:// or https:// URL of an OTLP/HTTP collector, e.g. "
            f"http://127.0.0.1:4318, got {otlp_endpoint!r}",
        )
    try:
        return exporter_from_options(otlp_endpoint, str(trace_file) if trace_file else None)
    except OSError as exc:
        raise ConfigError(
            "<command line>", "--trace-file", f"cannot append to {exc.filename}: {exc.strerror}"
        ) from exc


async def _shutdown_exporter(exporter: OTelExport) -> None:
    """Flush and stop the exporter, in a thread: an OTLP collector that does not answer
    may hold it for its export timeout. Bounded, and shielded: serving is ending because
    it was cancelled."""
    with trio.move_on_after(15) as scope:
        scope.shield = True
        await trio.to_thread.run_sync(exporter.shutdown, abandon_on_cancel=True)
    if scope.cancelled_caught:
        log.warning("the trace exporter did not shut down within 15 s; traces may be lost")


async def _serve(
    pipeline: PipelineConfig,
    deployment: DeploymentConfig,
    sock_path: str,
    tcp: str | None,
    http: str | None,
    token: str,
    user_token: str | None,
    ready_timeout: float,
    write_discovery: bool,
    on_ready: Callable[[ServeInfo], None] | None,
    disc: Path,
    task_status: trio.TaskStatus[ServeInfo],
    launch: _Launch,
    exporter: OTelExport | None,
) -> None:
    with contextlib.ExitStack() as stack:
        # Bound first: a port in use ends start-up before anything is spawned. Closed on
        # the way out, unless the control plane took it over (closing twice is harmless).
        http_sock = stack.enter_context(_listen_http(http)) if http else None
        # Shared artifacts (a model file, indexes) are built once here, before any instance
        # starts and before the ready timeout runs; instances then only load them.
        await trio.to_thread.run_sync(
            functools.partial(prepare_artifacts, pipeline, log=log.info), abandon_on_cancel=True
        )
        listeners = []
        unix = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        await unix.bind(sock_path)
        os.chmod(sock_path, 0o600)
        unix.listen(256)
        listeners.append(unix)
        tcp_address = None
        if tcp:
            host, port = parse_hostport(tcp, "--tcp")
            family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
            t = trio.socket.socket(family, _socket.SOCK_STREAM)
            t.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            await bind_or_explain(t, host, port, "--tcp")
            t.listen(256)
            t.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            listeners.append(t)
            tcp_address = f"{host}:{t.getsockname()[1]}"

        async with trio.open_nursery() as nursery:
            runtime = Runtime(pipeline, deployment, token=token, trace_exporter=exporter)
            try:
                await nursery.start(
                    functools.partial(runtime.serve, listeners, ssl_context=launch.ssl_context)
                )
                ctx = LaunchContext(
                    pipeline,
                    deployment,
                    token,
                    f"unix:{sock_path}",
                    tcp_address,
                    launch.tls_ca_pem,
                    nursery,
                    runtime.instance_exited,
                )
                runtime.launcher = await launch.cls.create(ctx, launch.options)
                runtime.start_instances()
                await runtime.wait_ready(ready_timeout)
                http_url = None
                if http:
                    from .control import serve_control
                    from .control._stream import DEFAULT_KEEPALIVE_S

                    host, _ = parse_hostport(http, "--http")
                    assert http_sock is not None
                    port = http_sock.getsockname()[1]
                    keepalive = launch.sse_keepalive or DEFAULT_KEEPALIVE_S
                    bound = await nursery.start(
                        lambda task_status: serve_control(
                            runtime,
                            host,
                            port,
                            token=user_token,
                            sock=http_sock,
                            task_status=task_status,
                            sse_keepalive=keepalive,
                        )
                    )
                    http_url = f"http://{host}:{bound}"
                info = ServeInfo(pipeline.name, sock_path, tcp_address, http_url, token, runtime)
                if write_discovery:
                    disc.parent.mkdir(parents=True, exist_ok=True)
                    tmp = disc.with_suffix(".tmp")
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with os.fdopen(fd, "w") as f:
                        json.dump(
                            {
                                "pipeline": pipeline.name,
                                "socket": sock_path,
                                "tcp": tcp_address,
                                "http": http_url,
                                "token": token,
                                "pid": os.getpid(),
                            },
                            f,
                        )
                    os.replace(tmp, disc)
                log.info(
                    "pipeline %r ready: socket %s%s%s",
                    pipeline.name,
                    sock_path,
                    f", tcp {tcp_address}{' (TLS)' if launch.ssl_context else ''}"
                    if tcp_address
                    else "",
                    f", http {http_url}" if http_url else "",
                )
                if on_ready is not None:
                    on_ready(info)
                task_status.started(info)
                await trio.sleep_forever()
            finally:
                await runtime.supervisor.shutdown()
                nursery.cancel_scope.cancel()


async def _watch_signals(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    """The first SIGINT/SIGTERM stops serving; later ones are logged while stopping."""
    async for sig in signals:
        if scope.cancel_called:
            log.warning("received %s again; still stopping the instances", signal.Signals(sig).name)
        else:
            log.info("received %s, stopping", signal.Signals(sig).name)
            scope.cancel()
