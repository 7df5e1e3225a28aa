"""The HTTP control plane: status, live statistics, scaling, request ingress, request
timelines and cancellation, metrics.

It sees the dataplane only through :class:`alto.control._api.ControlRuntime` (the
dataplane's :class:`~alto.dataplane._stats.RuntimeCommands` plus request outcomes,
timelines and cancellation).
Start it next to the runtime with ``await nursery.start(serve_control, runtime, host,
port)``, or build the ASGI app alone with :func:`create_app`.
"""

from ._app import DEFAULT_HTTP_PORT, create_app, default_dashboard_dir, serve_control

__all__ = ["DEFAULT_HTTP_PORT", "create_app", "default_dashboard_dir", "serve_control"]
