"""An async server in a thread of its own, for tests whose client blocks (selenium drives
a browser, schemathesis sends requests synchronously): the server cannot share the test's
event loop, so it gets its own ``trio.run`` in a thread.

A subclass writes ``main(ready)``: it starts what it serves, calls ``ready(value)`` once
(``start()`` returns that value to the test) and keeps serving until cancelled.
``stop()`` cancels it, waits for the thread and re-raises what ``main`` raised.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class TrioThread(Generic[T]):
    thread_name = "alto-test-server"
    start_timeout = 60.0  # seconds start() waits for ready()
    stop_timeout = 60.0  # seconds stop() waits for the thread

    def __init__(self) -> None:
        self._ready: queue.Queue[tuple[T] | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self.crash: BaseException | None = None

    async def main(self, ready: Callable[[T], None]) -> None:
        raise NotImplementedError

    def start(self) -> T:
        self._thread.start()
        result = self._ready.get(timeout=self.start_timeout)
        if isinstance(result, BaseException):
            raise result
        return result[0]

    def stop(self) -> None:
        if self._trio_token is not None and self._cancel is not None:
            try:
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._trio_token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=self.stop_timeout)
        assert not self._thread.is_alive(), f"{self.thread_name} did not stop"
        if self.crash is not None:
            raise AssertionError(f"{self.thread_name} failed") from self.crash

    def __enter__(self) -> T:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the test's thread
            self.crash = exc
            self._ready.put(exc)

    async def _main(self) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._cancel = scope
            await self.main(lambda value: self._ready.put((value,)))
