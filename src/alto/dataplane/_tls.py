"""TLS on the TCP dataplane: contexts, and a TLS connection that reads like a socket.

The relay reads every connection with ``sock.recv_into(buffer)`` into one long-lived
buffer, and each connection's writer sends with ``sock.send(data)`` (docs/relay.md: one
receive handles every complete frame in it). A TLS connection keeps that interface:
:class:`TLSSocket` is a :class:`trio.socket.SocketType` whose ``recv_into`` decrypts through
a :class:`trio.SSLStream` and copies the plaintext into the caller's buffer. So the relay's
read loop and its per-frame work are the same for UNIX, plain TCP and TLS connections; TLS
adds the decryption and one copy per receive, not per frame (``benchmarks/relay_bench.py``
has the rows). trio's SSLStream allows one task receiving while another sends, which is
exactly the relay's reader and writer per connection.

Where TLS is used:

* ``alto serve --tls-cert FILE --tls-key FILE`` (or ``[tls] cert, key`` in the deployment
  file): every connection accepted on ``--tcp`` must speak TLS; the UNIX socket, private
  to this machine (a 0700 directory), stays plain. The token is still required in HELLO.
* instances and clients: ``--tls-ca FILE`` or ``ALTO_TLS_CA`` names the PEM file of the
  CA to trust. It may be the runtime's own (self-signed, or leaf) certificate: partial
  chains are accepted, so pinning one certificate works. The host name dialled must match
  the certificate, as with HTTPS.

Errors: :func:`server_context` and :func:`client_context` raise ConfigError naming the file
that cannot be read or used. A failed handshake on an accepted connection (a plain client
at a TLS port, a client that does not trust the certificate) is logged as a refused
connection, and reads as :class:`ConnectionError` (an OSError) to the code using the socket.
"""

from __future__ import annotations

import builtins
import logging
import os
import socket
import ssl
from types import TracebackType
from typing import Any

import trio

from .._errors import ConfigError

log = logging.getLogger("alto.runtime")

__all__ = ["TLSSocket", "client_context", "client_context_from_env", "server_context"]

CA_ENV = "ALTO_TLS_CA"


def server_context(cert: str, key: str, *, where: str = "<command line>") -> ssl.SSLContext:
    """A server context for the runtime's TCP listener (TLS 1.2 or later).

    Raises ConfigError naming the file when the certificate chain or key cannot be loaded.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for path, flag in ((cert, "--tls-cert"), (key, "--tls-key")):
        if not os.path.isfile(path):
            raise ConfigError(where, flag, f"no such file: {path}")
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            where, "--tls-cert", f"cannot use certificate {cert} with key {key}: {exc}"
        ) from exc
    return ctx


def client_context(
    cafile: str | None = None, *, cadata: str | None = None, where: str = "--tls-ca"
) -> ssl.SSLContext:
    """A client context trusting the PEM file ``cafile`` (or the PEM text ``cadata``).

    The host name is checked. A partial chain is accepted, so a leaf certificate given as
    the CA is trusted by itself (pinning). Raises ConfigError when the CA cannot be loaded.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=cafile, cadata=cadata)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            "<command line>", where, f"cannot load the CA {cafile or '(PEM text)'}: {exc}"
        ) from exc
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


def client_context_from_env(cafile: str | None = None) -> ssl.SSLContext | None:
    """A client context from ``cafile`` or else ``$ALTO_TLS_CA``; None when neither is
    set (plain TCP). Raises ConfigError like :func:`client_context`."""
    where = "--tls-ca" if cafile else CA_ENV
    cafile = cafile or os.environ.get(CA_ENV) or None
    if cafile is None:
        return None
    return client_context(cafile, where=where)


class TLSSocket(trio.socket.SocketType):
    """A TLS connection over a connected trio socket, with the socket methods the relay
    and the peers use (``recv``, ``recv_into``, ``send``, ``shutdown``, ``close``).

    The handshake happens on the first receive or send. One task may receive while
    another sends (trio's SSLStream rule); two concurrent receivers or senders are a bug.
    Broken connections, failed handshakes included, raise ConnectionError.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        super().__init__()
        self._sock = sock
        self._server_side = server_side
        self._handshaken = False
        # https_compatible: a peer that closes without TLS's close_notify (a process that
        # exits, a runtime that drops a connection) is an ordinary EOF, as it is on a
        # plain socket. Frames are length-prefixed, so a truncation mid-frame is still
        # detected, by the frame decoder.
        self.stream = trio.SSLStream(
            trio.SocketStream(sock),
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            https_compatible=True,
        )

    def _broken(self, exc: BaseException) -> ConnectionError:
        cause = exc.__cause__ or exc
        if not self._handshaken:
            if self._server_side:
                try:
                    peer = self._sock.getpeername()
                except OSError:
                    peer = "?"
                log.warning("refused a connection from %s: TLS handshake failed: %s", peer, cause)
            return ConnectionError(f"TLS handshake failed: {cause}")
        return ConnectionError(f"TLS connection broken: {cause}")

    async def recv(self, buflen: int, flags: int = 0, /) -> bytes:
        try:
            data = await self.stream.receive_some(buflen)
        except trio.BrokenResourceError as exc:
            raise self._broken(exc) from exc
        self._handshaken = True
        return bytes(data)

    async def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        data = await self.recv(nbytes or len(view))
        n = len(data)
        view[:n] = data
        return n

    async def send(self, bytes: Any, flags: int = 0, /) -> int:
        view = memoryview(bytes)
        try:
            await self.stream.send_all(view)
        except trio.BrokenResourceError as exc:
            raise self._broken(exc) from exc
        self._handshaken = True
        return view.nbytes

    # Everything else is the underlying socket's.

    def fileno(self) -> int:
        return self._sock.fileno()

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def setsockopt(self, level: int, optname: int, value: Any, optlen: Any = None) -> None:
        if optlen is None:
            self._sock.setsockopt(level, optname, value)
        else:
            self._sock.setsockopt(level, optname, value, optlen)

    @property
    def family(self) -> socket.AddressFamily:
        return self._sock.family

    @property
    def type(self) -> socket.SocketKind:
        return self._sock.type

    @property
    def proto(self) -> int:
        return self._sock.proto

    def shutdown(self, flag: int) -> None:
        self._sock.shutdown(flag)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> TLSSocket:
        return self

    def __exit__(
        self,
        exc_type: builtins.type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TLSSocket over {self._sock!r}>"
