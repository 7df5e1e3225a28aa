"""What the control plane needs of a runtime: :class:`ControlRuntime`.

The dataplane's narrow command interface (:class:`~alto.dataplane._stats.RuntimeCommands`:
frozen statistics, scale, drain, submit) plus what serving requests observably needs:
the ingress's deadline and trace context, cancelling a request, the recent and slowest
requests with their timelines, and an observer told of every request that ends.
:class:`alto.dataplane.Runtime` implements it; ``tests/control_fake.py`` fakes it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from ..dataplane._stats import RequestEvent, RequestOutcome, RuntimeCommands

__all__ = ["ControlRuntime"]


class ControlRuntime(RuntimeCommands, Protocol):
    """A runtime the control plane can serve (see the module docstring)."""

    def submit(
        self, payload: bytes, *, timeout: float | None = None, traceparent: str | None = None
    ) -> AsyncIterator[RequestEvent]:
        """As :meth:`RuntimeCommands.submit`; ``timeout``: seconds until the request fails
        with "deadline exceeded"; ``traceparent``: a W3C trace context the request's trace
        continues. Raises ValueError (at the first ``__anext__``) for an input too large
        for one frame or an option out of range. Closing the iterator early cancels the
        request."""
        ...

    def cancel(self, request_id: int, reason: str = "cancelled") -> bool:
        """End a running request with an error saying ``reason``; False when it is unknown
        or had already ended."""
        ...

    def request_timeline(self, request_id: int) -> dict[str, Any] | None:
        """A request's state and timings and, when it was traced, its hops and spans; None
        when unknown (never admitted, or forgotten)."""
        ...

    def recent_requests(self, limit: int = 100) -> list[RequestOutcome]:
        """The most recent finished requests, newest first."""
        ...

    def slowest_requests(self, limit: int = 20) -> list[RequestOutcome]:
        """The slowest of the recent finished requests, slowest first."""
        ...

    def add_request_observer(self, observe: Callable[[RequestOutcome], None]) -> None:
        """Call ``observe(outcome)`` for every request that ends from now on."""
        ...
