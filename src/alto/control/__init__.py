"""The HTTP control plane: status, live statistics, scaling, request ingress, metrics.

It sees the dataplane only through :class:`alto.dataplane._stats.RuntimeCommands`.
Start it next to the runtime with ``await nursery.start(serve_control, runtime, host,
port)``, or build the ASGI app alone with :func:`create_app`.
"""

from ._app import DEFAULT_HTTP_PORT, create_app, default_dashboard_dir, serve_control

__all__ = ["DEFAULT_HTTP_PORT", "create_app", "default_dashboard_dir", "serve_control"]
