"""The dataplane: frame codec, runtime (topology, ledger, relay, supervisor), scheduler
policies, launchers, traces.

Layered one way: ``_frames`` (sans-IO) -> ``_schedulers`` -> ``_topology`` -> ``_ledger``
-> ``_relay`` -> ``_supervisor`` -> ``_runtime``; launchers plug in below the supervisor.
The dataplane never imports the control plane: it hands it frozen statistics
(``_stats``) and a small command interface.
"""

from ._frames import NEED_DATA, Frame, FrameDecoder, FrameFlags, FrameKind, encode
from ._runtime import Runtime
from ._schedulers import NoInstanceError, Scheduler, available_schedulers, load_scheduler
from ._stats import (
    HistogramSnapshot,
    InstanceState,
    InstanceStatistics,
    RequestEvent,
    RequestOutcome,
    RuntimeStatistics,
    ScaleEvent,
    StageStatistics,
)
from ._supervisor import ScaleConflict

__all__ = [
    "NEED_DATA",
    "Frame",
    "FrameDecoder",
    "FrameFlags",
    "FrameKind",
    "HistogramSnapshot",
    "InstanceState",
    "InstanceStatistics",
    "NoInstanceError",
    "RequestEvent",
    "RequestOutcome",
    "Runtime",
    "RuntimeStatistics",
    "ScaleConflict",
    "ScaleEvent",
    "Scheduler",
    "StageStatistics",
    "available_schedulers",
    "encode",
    "load_scheduler",
]
