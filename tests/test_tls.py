"""TLS on the TCP dataplane, with real processes and real sockets on 127.0.0.1.

A CA and a certificate for ``127.0.0.1`` are made in the test (trustme). Covered: a remote
instance (``alto worker --tls-ca``) and a client over TLS doing real work, a hand-played
peer (FakePeer) over TLS, a plain client refused by a TLS runtime, a client trusting
another CA refused, a pinned self-signed certificate accepted, plain TCP off loopback
refused without ``--insecure-tcp``, and TLS settings that are wrong in one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

import alto
from alto import ConfigError
from alto.dataplane import FrameKind, encode
from alto.dataplane._tls import client_context, server_context
from alto.examples.demo_pb2 import Number, Square, Total
from alto.testing import FakePeer, open_server

trustme = pytest.importorskip("trustme")

ROOT = Path(__file__).resolve().parents[1]
ALTO = [str(Path(sys.executable).parent / "alto")]
TOKEN = "tls-token"


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA's certificate (what clients trust)
    cert: Path  # the runtime's certificate chain for 127.0.0.1
    key: Path
    other_ca: Path  # a CA that did not sign it


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    c = Certs(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "o.pem")
    ca.cert_pem.write_to_path(str(c.ca))
    c.cert.write_bytes(b"".join(p.bytes() for p in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(c.key))
    trustme.CA().cert_pem.write_to_path(str(c.other_ca))
    return c


def demo(tmp_path: Path) -> tuple[Path, Path]:
    text = (ROOT / "configs" / "demo.toml").read_text()
    text = text.replace('name = "demo"', f'name = "tls-{os.getpid()}"')
    text = text.replace("delay = 0.05", "delay = 0.0")
    p = tmp_path / "pipeline.toml"
    p.write_text(text)
    d = tmp_path / "deploy.toml"
    d.write_text("[runtime]\nstop_timeout = 3.0\n")
    return p, d


async def start_only(pipeline: Path, deploy: Path, **options: object) -> None:
    """Run ``alto.serve`` for a start-up that must fail (it raises before serving)."""
    try:
        with trio.fail_after(30):
            await alto.serve(
                pipeline, deploy, http=None, write_discovery=False, handle_signals=False, **options
            )  # type: ignore[arg-type]
    except BaseExceptionGroup as group:  # raised inside serve's nursery: its one error
        while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
            group = group.exceptions[0]
        raise group from None
    raise AssertionError("alto.serve returned")


@asynccontextmanager
async def tls_server(tmp_path: Path, certs: Certs) -> AsyncIterator[alto.ServeInfo]:
    pipeline, deploy = demo(tmp_path)
    async with open_server(
        pipeline,
        deploy,
        tcp="127.0.0.1:0",
        token=TOKEN,
        tls_cert=str(certs.cert),
        tls_key=str(certs.key),
    ) as info:
        yield info


async def test_worker_and_client_over_tls(tmp_path: Path, certs: Certs) -> None:
    async with tls_server(tmp_path, certs) as info:
        assert info.tcp_address is not None
        rt = info.runtime
        env = {k: v for k, v in os.environ.items() if k not in ("ALTO_TOKEN", "ALTO_TLS_CA")}
        # the remote instance trusts the CA and says HELLO with the token, over TLS
        remote = await trio.lowlevel.open_process(
            [*ALTO, "worker", "--pipeline", str(tmp_path / "pipeline.toml"), "--stage", "square",
             "--connect", info.tcp_address, "--token", TOKEN, "--tls-ca", str(certs.ca)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            with trio.fail_after(60):
                while len(rt.active_instances("square")) < 2 or any(
                    i.state == "starting" for i in rt.active_instances("square")
                ):
                    await trio.sleep(0.05)
            local, remote_inst = sorted(rt.active_instances("square"), key=lambda i: i.id)
            assert not remote_inst.launched
            await rt.drain(local.id)  # from now on only the TLS instance squares
            async with alto.open_client(
                address=info.tcp_address, token=TOKEN, tls_ca=str(certs.ca)
            ) as client:
                for n in (5, 12):
                    rs = await client.run(Number(value=n))
                    totals = [r.message.total for r in rs if isinstance(r.message, Total)]
                    assert totals == [sum(i * i for i in range(n))]
                    squarers = {r.message.instance for r in rs if isinstance(r.message, Square)}
                    assert squarers == {remote_inst.id}
        finally:
            remote.kill()
            await remote.wait()


async def test_fake_peer_over_tls(tmp_path: Path, certs: Certs) -> None:
    """FakePeer speaks TLS too (the relay benchmark's peers use it): a client's SUBMIT is
    accepted and a frame relayed back over the runtime's TLS listener."""
    async with tls_server(tmp_path, certs) as info:
        assert info.tcp_address is not None
        ctx = client_context(str(certs.ca))
        peer = await FakePeer.connect(info.tcp_address, ssl_context=ctx)
        try:
            await peer.client(TOKEN)
            assert peer.welcome["input"] == "numbers"
            payload = Number(value=3).SerializeToString()
            await peer.send(encode(FrameKind.SUBMIT, [1], "numbers", payload))
            accepted = await peer.expect(FrameKind.ACCEPTED)
            assert accepted.key_path[0] == 1
            await peer.expect(FrameKind.DONE, timeout=30)
        finally:
            peer.close()


async def test_plain_client_refused_by_tls_runtime(tmp_path: Path, certs: Certs) -> None:
    async with tls_server(tmp_path, certs) as info:
        assert info.tcp_address is not None
        env = {k: v for k, v in os.environ.items() if k != "ALTO_TLS_CA"}
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("ALTO_TLS_CA", raising=False)
            with pytest.raises((alto.AuthenticationError, alto.RuntimeUnavailable)):
                async with alto.open_client(address=info.tcp_address, token=TOKEN):
                    pass
        # the same for an instance: no WELCOME, the worker exits with an error
        plain = await trio.run_process(
            [*ALTO, "worker", "--pipeline", str(tmp_path / "pipeline.toml"), "--stage", "square",
             "--connect", info.tcp_address, "--token", TOKEN],
            env=env, capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        assert plain.returncode != 0
        assert len(info.runtime.active_instances("square")) == 1


async def test_wrong_ca_refused(tmp_path: Path, certs: Certs) -> None:
    async with tls_server(tmp_path, certs) as info:
        assert info.tcp_address is not None
        with pytest.raises(alto.RuntimeUnavailable, match="TLS handshake"):
            async with alto.open_client(
                address=info.tcp_address, token=TOKEN, tls_ca=str(certs.other_ca)
            ):
                pass
        # the right CA still works on the same listener
        async with alto.open_client(
            address=info.tcp_address, token=TOKEN, tls_ca=str(certs.ca)
        ) as client:
            rs = await client.run(Number(value=2))
            assert [r.message.total for r in rs if isinstance(r.message, Total)] == [1]


async def test_tls_still_needs_the_token(tmp_path: Path, certs: Certs) -> None:
    async with tls_server(tmp_path, certs) as info:
        assert info.tcp_address is not None
        with pytest.raises(alto.AuthenticationError):
            async with alto.open_client(
                address=info.tcp_address, token="wrong", tls_ca=str(certs.ca)
            ):
                pass


async def test_pinned_self_signed_certificate(tmp_path: Path) -> None:
    """A self-signed certificate given as the CA is trusted by itself (what launched
    instances get by default: the runtime's own certificate)."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    pipeline, deploy = demo(tmp_path)
    async with open_server(
        pipeline, deploy, tcp="127.0.0.1:0", token=TOKEN, tls_cert=str(cert), tls_key=str(key)
    ) as info:
        assert info.tcp_address is not None
        # the leaf alone (not its CA) as the trust anchor
        async with alto.open_client(
            address=info.tcp_address, token=TOKEN, tls_ca=str(cert)
        ) as client:
            rs = await client.run(Number(value=3))
            assert [r.message.total for r in rs if isinstance(r.message, Total)] == [5]


async def test_non_loopback_plain_tcp_needs_the_opt_in(tmp_path: Path) -> None:
    pipeline, deploy = demo(tmp_path)
    with pytest.raises(ConfigError, match="--insecure-tcp") as err:
        await start_only(pipeline, deploy, tcp="0.0.0.0:0", token=TOKEN)
    assert "--tls-cert" in str(err.value)
    # With the opt-in, start-up goes past the TLS check to binding. 192.0.2.1 (TEST-NET-1)
    # is no address of this machine, so nothing is bound off loopback by this test.
    with pytest.raises(ConfigError, match="not an address of this machine"):
        await start_only(pipeline, deploy, tcp="192.0.2.1:0", token=TOKEN, insecure_tcp=True)


async def test_tls_settings_errors(tmp_path: Path, certs: Certs) -> None:
    pipeline, deploy = demo(tmp_path)
    with pytest.raises(ConfigError, match="both --tls-cert and --tls-key"):
        await start_only(pipeline, deploy, tcp="127.0.0.1:0", token=TOKEN, tls_cert=str(certs.cert))
    with pytest.raises(ConfigError, match="--tcp"):
        await start_only(
            pipeline, deploy, token=TOKEN, tls_cert=str(certs.cert), tls_key=str(certs.key)
        )
    with pytest.raises(ConfigError, match="no such file"):
        server_context(str(tmp_path / "missing.pem"), str(certs.key))
    with pytest.raises(ConfigError, match="cannot use certificate"):
        server_context(str(certs.ca), str(certs.key))  # a key that does not match
    with pytest.raises(ConfigError, match="cannot load the CA"):
        client_context(str(tmp_path / "missing.pem"))


async def test_tls_from_the_deployment_file(tmp_path: Path, certs: Certs) -> None:
    """``[tls] cert, key`` in the deployment file, relative to it."""
    pipeline, deploy = demo(tmp_path)
    deploy.write_text('[runtime]\nstop_timeout = 3.0\n[tls]\ncert = "cert.pem"\nkey = "key.pem"\n')
    async with open_server(pipeline, deploy, tcp="127.0.0.1:0", token=TOKEN) as info:
        assert info.tcp_address is not None
        async with alto.open_client(
            address=info.tcp_address, token=TOKEN, tls_ca=str(certs.ca)
        ) as client:
            rs = await client.run(Number(value=4))
            assert [r.message.total for r in rs if isinstance(r.message, Total)] == [14]
    deploy.write_text('[tls]\ncert = "cert.pem"\n')
    with pytest.raises(ConfigError, match=r"tls\.key: missing"):
        await start_only(pipeline, deploy, tcp="127.0.0.1:0", token=TOKEN)
