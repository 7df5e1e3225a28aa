"""The supervisor (``alto.dataplane._supervisor``): registration, draining, losses, the
records of ended instances, failed starts, shutdown.

Most tests play the instances with fake peers (see ``runtime_helpers``); one runs real
instance processes with :func:`alto.testing.open_server` (marked ``slow``), whose stage is
defined here and imported by the workers as ``test_supervisor:write_then_crash`` (the test
puts this directory on their ``PYTHONPATH``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import anyio
import pytest
import trio
from runtime_helpers import AB, TOKEN, demo_pipeline, make_runtime, one_request, serving, write

import alto
from alto import AltoError
from alto._worker import _Output
from alto.dataplane import FrameKind, InstanceState
from alto.dataplane._supervisor import ENDED_HISTORY
from alto.examples.demo_pb2 import Number, Square
from alto.testing import open_server

# One idempotent stage; real processes.
IDEMPOTENT = """\
[pipeline]
name = "NAME"
input = "numbers"
outputs = ["out"]
[queues.numbers]
type = "alto.examples.demo_pb2:Number"
[queues.out]
type = "alto.examples.demo_pb2:Square"
[stages.echo]
entry = "test_supervisor:write_then_crash"
inputs = ["numbers"]
outputs = ["out"]
idempotent = true
"""


async def write_then_crash(msg: Number, ctx: alto.Context) -> None:
    """Writes its output; the first instance to get here then dies (exactly once), after
    its output has left the process."""
    await ctx.write("out", Square(value=msg.value, instance=ctx.instance))
    try:  # O_EXCL: one instance, once, across processes
        os.close(os.open(os.environ["ALTO_TEST_MARKER"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    # No checkpoint since the write: the output is still in the worker's buffer. Wait
    # until its flusher has sent it (the flusher sets ``drained`` once the buffer is empty).
    # The worker's output buffer (of ``python -m alto._worker``: its class is
    # ``__main__._Output`` there, so no isinstance check).
    out = cast(_Output, ctx._out)
    out.drained = anyio.Event()
    await out.drained.wait()
    os._exit(1)


# --------------------------------------------------------------------------- draining


async def test_draining_the_last_instance_of_a_stage_is_refused(tmp_path: Path) -> None:
    rt = make_runtime(write(tmp_path, AB))
    async with serving(rt) as connect:
        a = await connect().instance(TOKEN, "a")
        b = await connect().instance(TOKEN, "b")
        with pytest.raises(ValueError, match="last of stage 'b'"):
            await rt.drain(b.id)
        assert rt.instances[b.id].state == InstanceState.READY
        assert rt.stages["b"].target_instances == 1
        assert await b.pump() == []  # no STOP
        # with a second instance, draining one is fine
        b2 = await connect().instance(TOKEN, "b")
        await rt.drain(b.id)
        assert rt.instances[b.id].state == InstanceState.DRAINING
        assert (await b.expect()).kind == FrameKind.STOP
        await one_request(await connect().client(TOKEN), 1, a, b2)


# --------------------------------------------------------------------------- losses and the
# records of ended instances


@pytest.mark.slow
async def test_idempotent_stage_that_crashes_after_writing_fails_its_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"idem-{os.getpid()}-{tmp_path.name[-20:]}"
    pipeline = write(tmp_path, IDEMPOTENT.replace("NAME", name))
    deploy = write(
        tmp_path, "[runtime]\nstop_timeout = 2.0\n[stages.echo]\ninstances = 2\n", "d.toml"
    )
    # the workers import this module
    monkeypatch.setenv(
        "PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    marker = tmp_path / "crashed"
    monkeypatch.setenv("ALTO_TEST_MARKER", str(marker))
    results: list[alto.Result] = []
    async with open_server(pipeline, deploy) as info:
        async with alto.open_client(address="unix:" + info.socket_path, token=info.token) as c:
            with trio.fail_after(30):
                with pytest.raises(alto.RequestFailed) as err:
                    async for r in c.submit(Number(value=7)):
                        results.append(r)
                # the instance wrote, then died: retrying would write the output twice
                assert "stage 'echo' instance" in err.value.message
                assert "crashed" in err.value.message
                assert marker.exists()
                (result,) = results  # written once, not again
                assert isinstance(result.message, Square) and result.message.value == 7
                assert info.runtime.statistics().frames_retried == 0
                # the surviving instance serves the next request, once
                again = await c.run(Number(value=8))
        (result,) = again
        assert result.queue == "out" and isinstance(result.message, Square)
        assert result.message.value == 8
        states = sorted(str(i.state) for i in info.runtime.instances.values())
        assert states == ["crashed", "ready"]


async def test_ended_instances_are_forgotten_past_a_history(tmp_path: Path) -> None:
    runtime = make_runtime(demo_pipeline(tmp_path))
    ids = [runtime.supervisor.new_instance("square").id for _ in range(40)]
    for iid in ids:
        runtime.instance_lost(runtime.instances[iid], "gone", quiet=True)
    kept = [i.instance_id for i in runtime.statistics().instances if i.stage == "square"]
    assert kept == ids[-16:]  # the most recent 16 ended records stay for the operator


class FailingLauncher:
    """A launcher whose every spawn fails, as when the worker cannot be started."""

    def __init__(self) -> None:
        self.spawned: list[int] = []

    async def spawn(self, stage: str, instance_id: int) -> None:
        await trio.lowlevel.checkpoint()
        self.spawned.append(instance_id)
        raise OSError(f"[Errno 2] No such file or directory: 'python' (for {stage})")

    def stop(self, instance_id: int) -> None:
        raise AssertionError("nothing started, nothing to stop")

    async def shutdown(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_spawn_failing_inside_scale_is_reported_once_and_forgotten(
    tmp_path: Path,
) -> None:
    runtime = make_runtime(demo_pipeline(tmp_path))
    launcher = FailingLauncher()
    runtime.launcher = launcher
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.serve, ())
        for attempt in range(ENDED_HISTORY + 8):
            await runtime.scale("square", 1)  # answers at once; the spawn fails later
            with pytest.raises(AltoError) as err:
                await runtime.wait_ready()
            iid = launcher.spawned[-1]
            assert str(err.value) == (
                f"instance square/{iid} failed to start: could not be started: "
                "[Errno 2] No such file or directory: 'python' (for square)"
            )
            await runtime.wait_ready()  # reported once: nothing is starting any more
            assert len(launcher.spawned) == attempt + 1
        nursery.cancel_scope.cancel()
    # every failed start was recorded (crashed, with its error), then forgotten like any
    # ended instance past the history: the records do not grow with the attempts
    kept = {i.instance_id: i for i in runtime.statistics().instances}
    assert list(kept) == launcher.spawned[-ENDED_HISTORY:]
    assert all(i.state == InstanceState.CRASHED for i in kept.values())
    assert all("could not be started" in str(i.last_error) for i in kept.values())
    assert set(runtime.stages["square"].instances) == set(kept)


# --------------------------------------------------------------------------- shutdown


async def test_requests_are_refused_once_shutdown_begins(tmp_path: Path) -> None:
    runtime = make_runtime(demo_pipeline(tmp_path))
    runtime.begin_shutdown()
    with pytest.raises(alto.OverloadedError, match="shutting down"):
        async for _ in runtime.submit(b""):
            pass
    assert runtime.statistics().requests_refused == 1
