"""The alto exception hierarchy.

Everything alto raises on purpose derives from :class:`AltoError`::

    AltoError
    +-- ConfigError            a pipeline or deployment file is wrong (names file, key, allowed values)
    +-- PluginError            a scheduler or engine plugin is unknown or failed to load
    |   +-- UnknownPluginError the name is not registered (lists the available names)
    +-- ProtocolError          a frame broke the wire protocol
    |   +-- LocalProtocolError  we were asked to encode something invalid (our bug, or the caller's)
    |   +-- RemoteProtocolError the peer sent something invalid (the connection is closed)
    +-- AuthenticationError    a peer presented no token or the wrong one
    +-- StageError             stage code raised or misused the SDK (names stage and instance)
    +-- RequestFailed          a request ended in an error (names the failing stage and instance)
    +-- OverloadedError        the runtime refused a request because it is past its limits
    +-- RuntimeUnavailable     no runtime is reachable at the given address

Foreign exceptions are translated at the boundary and chained (``raise X from exc``), as
httpcore does.
"""

from __future__ import annotations


class AltoError(Exception):
    """Base class of every error alto raises on purpose."""


class ConfigError(AltoError):
    """A configuration file is invalid.

    ``path`` is the file, ``key`` the dotted key that is wrong (or ``None`` for the whole
    file), and the message says what was expected.
    """

    def __init__(self, path: str, key: str | None, message: str) -> None:
        self.path = path
        self.key = key
        self.message = message
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {message}")


class PluginError(AltoError):
    """A plugin failed to load; carries the plugin's group and name."""

    def __init__(self, group: str, name: str, message: str) -> None:
        self.group = group
        self.name = name
        super().__init__(f"{group} plugin {name!r}: {message}")


class UnknownPluginError(PluginError):
    """No plugin of that name is registered in the entry point group."""

    def __init__(self, group: str, name: str, available: list[str]) -> None:
        self.available = sorted(available)
        super().__init__(
            group, name, f"not registered; available: {', '.join(self.available) or '(none)'}"
        )


class ProtocolError(AltoError):
    """A frame violates the alto wire protocol."""


class LocalProtocolError(ProtocolError):
    """We were asked to build a frame that the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer has misbehaved: the connection it came from must be closed."""


class AuthenticationError(AltoError):
    """The peer did not present the runtime's token."""


class StageError(AltoError):
    """Stage code raised, or used the SDK in a way its declaration forbids."""

    def __init__(self, stage: str, instance: int | None, message: str) -> None:
        self.stage = stage
        self.instance = instance
        self.message = message
        who = f"stage {stage!r}" + (f" instance {instance}" if instance is not None else "")
        super().__init__(f"{who}: {message}")


class RequestFailed(AltoError):
    """A request ended in an error; ``request_id`` names it."""

    def __init__(self, request_id: int, message: str) -> None:
        self.request_id = request_id
        self.message = message
        super().__init__(f"request {request_id} failed: {message}")


class OverloadedError(AltoError):
    """The runtime is past its in-flight limit and refused the request; retry later."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class RuntimeUnavailable(AltoError):
    """No alto runtime answered at the address given."""


MAX_ERROR_CHARS = 4096
"""Characters of an error message kept in frames, logs and statistics. A stage may raise
with a whole document as its message; what travels and is stored stays small."""


def truncate_error(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``message`` cut to ``limit`` characters, saying how many were left out."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... ({len(message) - limit} more characters)"
