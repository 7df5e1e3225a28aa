"""alto: serve compound AI pipelines by streaming partial outputs between stages.

The public API: the stage SDK (:class:`Context`, :func:`write`), the client
(:func:`open_client`), configuration (:func:`load_pipeline`, :func:`load_deployment`),
:func:`serve`, and the error hierarchy.
"""

from ._client import Client, Result, open_client
from ._config import DeploymentConfig, PipelineConfig, StageConfig, load_deployment, load_pipeline
from ._errors import (
    AltoError,
    AuthenticationError,
    ConfigError,
    LocalProtocolError,
    OverloadedError,
    PluginError,
    ProtocolError,
    RemoteProtocolError,
    RequestFailed,
    RuntimeUnavailable,
    StageError,
    UnknownPluginError,
)
from ._serve import ServeInfo, serve
from ._stage import Child, Context, current_context, prefix_key, write

__version__ = "0.1.0"

__all__ = [
    "AltoError",
    "AuthenticationError",
    "Child",
    "Client",
    "ConfigError",
    "Context",
    "DeploymentConfig",
    "LocalProtocolError",
    "OverloadedError",
    "PipelineConfig",
    "PluginError",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestFailed",
    "Result",
    "RuntimeUnavailable",
    "ServeInfo",
    "StageConfig",
    "StageError",
    "UnknownPluginError",
    "current_context",
    "load_deployment",
    "load_pipeline",
    "open_client",
    "prefix_key",
    "serve",
    "write",
]
