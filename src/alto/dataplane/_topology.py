"""The topology records: stages and instances as the relay sees them, derived from the config.

Everything the relay needs to route a frame without thinking is computed here once, from
the pipeline and deployment files, and kept on plain records that the hot path reads
through attribute lookups:

* per stage: its aggregation level and the byte length of its group key, which upstream
  stages can produce items for its groups (``upstream``), which accounting the ledger must
  keep for frames *entering* it (``tracked``, ``track_levels``, ``tracks_children``; see
  docs/architecture.md, "Accounting"), the tag of its fan-out child ids, and its live
  routing state (scheduler, instances, loads, pinned groups);
* per instance: its connection, credits, queue depth, backlog and supervision state;
* per queue: the stage that reads it, or ``None`` for a sink queue (``Topology.routes``,
  keyed by the queue name's bytes as they appear in frames).

Nothing here does I/O or decides anything at run time: the ledger (``_ledger``) owns the
accounting rules, the relay (``_relay``) moves frames, the supervisor (``_supervisor``)
starts and stops instances.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import trio

from .._config import DeploymentConfig, PipelineConfig, StageConfig
from ._connections import Conn
from ._frames import PATH_OFFSET
from ._schedulers import Scheduler, load_scheduler
from ._stats import InstanceState

__all__ = ["Instance", "Stage", "Topology", "derive_topology"]


class Stage:
    """One stage: what the config fixes about routing into it, and its live routing state."""

    def __init__(self, index: int, cfg: StageConfig, scheduler: Scheduler) -> None:
        self.index = index
        self.cfg = cfg
        self.name = cfg.name
        self.scheduler = scheduler
        # Aggregation: a stateful stage's group is the key path's first ``level`` ids,
        # i.e. the frame bytes [PATH_OFFSET, key_end).
        self.level = cfg.aggregate_level or 0
        self.key_end = PATH_OFFSET + 8 * self.level
        # Idempotent stages keep each in-flight frame until its ACK, to retry it elsewhere.
        self.retains = cfg.idempotent
        # Set by derive_topology (they depend on the other stages):
        self.upstream: tuple[int, ...] = ()  # indexes of every stage that can reach this one
        self.track_levels: tuple[int, ...] = ()  # levels of the stateful stages downstream
        self.tracked = False  # entries here can hold a stateful group open: count exact paths
        self.tracks_children = False  # this stage's closed children matter to a group
        self.child_tag = 0  # OR-ed into fan-out child ids (see derive_topology)
        # Live routing state.
        self.instances: dict[int, Instance] = {}  # every known instance, ended ones too
        self.loads: dict[int, int] = {}  # queue depth of the instances the scheduler may pick
        self.groups: dict[bytes, Instance] = {}  # open group key -> the instance it is pinned to
        self.target_instances = 1
        self.max_instances = 1
        self.crash_times: list[float] = []
        self.frames_processed = 0
        self.errors = 0
        # Histograms the instances report (STATS frames), cumulative: name -> {buckets,
        # sum, count}; see alto._telemetry.
        self.metrics: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"<Stage {self.name}>"


class Instance:
    """One stage instance: a process (or remote worker) connected to the runtime."""

    def __init__(self, iid: int, stage: Stage, credits: int, *, launched: bool) -> None:
        self.id = iid
        self.stage = stage
        self.credits = credits  # the most unacknowledged frames it may hold
        # Started by this runtime's launcher (and so replaced by it after a crash), or
        # connected on its own (``alto worker --connect``): nobody here can restart those.
        self.launched = launched
        self.slot = 0  # its place among its stage's live instances (per-instance options)
        self.state = InstanceState.STARTING
        self.conn: Conn | None = None
        self.credits_in_use = 0  # frames sent to it and not yet acknowledged
        self.queue_depth = 0  # frames routed to it and not yet acknowledged (sent + backlog)
        self.backlog: deque[bytes] = deque()  # frames waiting in the runtime for a credit
        self.open_groups = 0  # aggregation groups pinned to it
        self.frames_in = 0  # frames it sent to the runtime
        self.frames_out = 0  # frames the runtime sent to it
        self.pid: int | None = None
        self.gauges: dict[str, float] = {}  # the stage object's own numbers (STATS)
        self.exit_code: int | None = None
        self.last_error: str | None = None
        self.req_counts: dict[int, int] = {}  # request id -> frames of it routed here, unacked
        self.unblocked = trio.lowlevel.ParkingLot()  # readers waiting for its backlog to drain
        # Idempotent stages: in-flight frames by key path, kept until acknowledged, so that
        # a crash can hand the unstarted ones to another instance (see _supervisor).
        self.retained: dict[bytes, deque[bytes]] | None = {} if stage.retains else None
        # ... and the paths whose inputs already produced output (a retry would duplicate
        # it). Inputs that share one key path on one instance cannot be told apart by
        # their outputs: once one of them wrote, all count as started.
        self.started: set[bytes] = set()

    @property
    def active(self) -> bool:
        """Starting or ready: counts towards its stage's instances."""
        return self.state in (InstanceState.READY, InstanceState.STARTING)

    @property
    def ended(self) -> bool:
        return self.state in (InstanceState.STOPPED, InstanceState.CRASHED)

    def __repr__(self) -> str:
        return f"<Instance {self.stage.name}/{self.id} {self.state}>"


@dataclass(eq=False)
class Topology:
    stages: dict[str, Stage]
    by_index: list[Stage]
    # queue name bytes -> the stage reading it, or None for a sink queue
    routes: dict[bytes, Stage | None]


def derive_topology(pipeline: PipelineConfig, deployment: DeploymentConfig) -> Topology:
    """Build the stage records of ``pipeline`` with the targets of ``deployment``.

    Raises PluginError when a stage names an unknown scheduler or bad scheduler options.
    """
    stages: dict[str, Stage] = {}
    for i, (name, cfg) in enumerate(pipeline.stages.items()):
        stages[name] = Stage(i, cfg, load_scheduler(cfg.scheduler, **dict(cfg.scheduler_options)))
    by_index = list(stages.values())
    for st in by_index:
        st.upstream = tuple(sorted(stages[u].index for u in pipeline.upstream(st.name)))
        st.target_instances = deployment.instances(st.name)
        st.max_instances = deployment.max_instances(st.name)
    for st in by_index:
        # The ledger counts exact paths of frames entering ``st`` only when a stateful
        # stage downstream can have a group held open by them, and only at its level.
        levels = {s.level for s in by_index if s.cfg.stateful and st.index in s.upstream}
        st.track_levels = tuple(sorted(levels))
        st.tracked = bool(levels)
        # A closed child matters only to groups at least as deep as the child.
        st.tracks_children = st.cfg.fanout and bool(levels) and max(levels) > st.cfg.input_depth
    # A fan-out child id is tagged with the stage only where two fan-out stages receive
    # paths of the same depth: there, equal counters would name different streams.
    fanouts_at: dict[int, int] = {}
    for st in by_index:
        if st.cfg.fanout:
            fanouts_at[st.cfg.input_depth] = fanouts_at.get(st.cfg.input_depth, 0) + 1
    for st in by_index:
        if st.cfg.fanout and fanouts_at[st.cfg.input_depth] > 1:
            st.child_tag = (st.index + 1) << 40
    routes: dict[bytes, Stage | None] = {}
    for q in pipeline.queues:
        dst = pipeline.consumer.get(q)
        routes[q.encode()] = stages[dst] if dst else None
    return Topology(stages, by_index, routes)
