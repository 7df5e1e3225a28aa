"""The dataplane: frame codec, runtime relay, scheduler policies, launcher.

Layered one way: ``_frames`` (sans-IO) -> ``_schedulers`` -> ``_runtime`` -> ``_launcher``.
The dataplane never imports the control plane.
"""

from ._frames import NEED_DATA, Frame, FrameDecoder, FrameFlags, FrameKind, encode
from ._runtime import Runtime
from ._schedulers import NoInstanceError, Scheduler, available_schedulers, load_scheduler
from ._stats import (
    InstanceState,
    InstanceStatistics,
    RequestEvent,
    RuntimeStatistics,
    StageStatistics,
)

__all__ = [
    "NEED_DATA",
    "Frame",
    "FrameDecoder",
    "FrameFlags",
    "FrameKind",
    "InstanceState",
    "InstanceStatistics",
    "NoInstanceError",
    "RequestEvent",
    "Runtime",
    "RuntimeStatistics",
    "Scheduler",
    "StageStatistics",
    "available_schedulers",
    "encode",
    "load_scheduler",
]
