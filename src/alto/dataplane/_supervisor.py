"""The supervisor: instance ids, registration, loss, exit, scaling, draining, replacement.

What happens when an instance crashes, in order (:meth:`Supervisor.lost`):

1. it leaves its stage's scheduler, so no new work goes to it;
2. requests with a group pinned to it fail ("stage S instance N crashed: reason"): a
   group's state died with the process, and moving it would split the aggregation
   (design invariant 1);
3. its other in-flight work: for an ``idempotent`` stage, every input it held that has
   not produced output is retried on another instance of the stage (re-running it is
   safe by declaration); if none is ready, the retries wait for the replacement (step 5),
   and fail only if no replacement can come. Inputs that already produced part of their
   output fail their requests: a retry would duplicate that output. For other stages,
   every request with work on it fails. Nothing is dropped silently (invariant 4);
4. its backlog and credits are released;
5. an instance that this runtime's launcher started is replaced after a back-off of
   0.25 s doubling per crash (at most 8 s); a stage that crashes more than
   ``MAX_RESTARTS`` times within ``RESTART_WINDOW`` seconds is left alone (logged) until
   an operator scales it. Instances that connected on their own (``alto worker
   --connect``) are not replaced: nobody here can start them.

Scaling (:meth:`Supervisor.scale`) answers at once with the new target; spawning goes on in
the background and each new instance is visible (``starting``) in the statistics. Scaling
down drains: a draining instance gets no new groups or inputs, finishes what is pinned to
it or in flight, then gets STOP. Bounds: a stage never exceeds its ``max_instances``, and
the runtime never runs more than ``[runtime] max_instances`` instance processes, whether
asked by an operator, by the deployment file or by replacements.

:meth:`Supervisor.wait_ready` replaces polling the instances' states: it returns when no
instance is starting and raises when one failed to start.
"""

from __future__ import annotations

import itertools
import logging
import math
import struct
from collections import deque

import trio

from .._config import DeploymentConfig
from .._errors import AltoError, truncate_error
from ._autoscaler import AutoscalePolicy
from ._connections import Conn
from ._frames import FrameKind, encode
from ._launcher import Launcher
from ._ledger import Ledger
from ._relay import Relay
from ._schedulers import NoInstanceError
from ._stats import InstanceState, ScaleEvent
from ._topology import Instance, Stage, Topology

log = logging.getLogger("alto.runtime")

__all__ = ["MAX_RESTARTS", "RESTART_WINDOW", "Supervisor"]

MAX_RESTARTS = 5  # crashes of one stage within RESTART_WINDOW before it is not replaced
RESTART_WINDOW = 60.0
ENDED_HISTORY = 16  # ended instances of a stage kept in the statistics
SCALE_LOG = 64  # scale events kept in the statistics


class Refused(Exception):
    """A registration the runtime does not accept; the message goes back to the peer."""


class ScaleConflict(ValueError):
    """A manual scale of a stage that the autoscaler owns (HTTP 409)."""


class Supervisor:
    """Keeps every stage at its target number of instances, within its limits."""

    def __init__(
        self,
        topology: Topology,
        ledger: Ledger,
        relay: Relay,
        deployment: DeploymentConfig,
    ) -> None:
        self.topology = topology
        self.ledger = ledger
        self.relay = relay
        self.deployment = deployment
        self.max_processes = deployment.runtime.max_instances
        self.instances: dict[int, Instance] = {}
        self._ids = itertools.count(1)
        self.launcher: Launcher | None = None
        self.nursery: trio.Nursery | None = None  # for spawns and replacements (set by serve)
        self.closing = False  # set by begin_shutdown(): losses are then expected
        self.restarts = 0
        self.scale_events = 0
        self._changed = trio.Event()  # set (and replaced) whenever an instance changes state
        self._failed_starts: list[Instance] = []  # not yet reported by wait_ready()
        self.autoscaled: dict[str, AutoscalePolicy] = {}  # stages the autoscaler owns
        self.scale_log: deque[ScaleEvent] = deque(maxlen=SCALE_LOG)
        # Idempotent retries waiting for an instance of their stage (stage index -> frames).
        self._pending: dict[int, deque[bytes]] = {}

    # ------------------------------------------------------------------ ids and records

    def active(self, stage: Stage) -> list[Instance]:
        """Instances of ``stage`` that are starting or ready."""
        return [i for i in stage.instances.values() if i.active]

    def processes(self) -> int:
        """Instance processes this runtime runs or is starting (draining ones included)."""
        return sum(1 for i in self.instances.values() if i.launched and not i.ended)

    def new_instance(self, stage: str, *, launched: bool = True) -> Instance:
        """Reserve an id, a slot and a record for an instance of ``stage`` about to start.

        The slot is the lowest the stage's other live instances do not hold (0, 1, ...): a
        replacement takes over the slot of the instance it replaces, and with it that
        slot's ``instance_options`` from the deployment file."""
        st = self.topology.stages[stage]
        inst = Instance(next(self._ids), st, self.deployment.credits(stage), launched=launched)
        taken = {i.slot for i in st.instances.values() if not i.ended}
        inst.slot = next(k for k in itertools.count() if k not in taken)
        self.instances[inst.id] = inst
        st.instances[inst.id] = inst
        self._notify()
        return inst

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _forget_old(self, st: Stage) -> None:
        """Keep the records of only the last ``ENDED_HISTORY`` ended instances of a stage,
        so that scaling up and down for days does not grow the runtime (or its statistics)."""
        ended = [i for i in st.instances.values() if i.ended]
        for inst in ended[: max(0, len(ended) - ENDED_HISTORY)]:
            del st.instances[inst.id]
            self.instances.pop(inst.id, None)

    # ------------------------------------------------------------------ registration

    def register(self, stage: str, iid: int | None, pid: object, conn: Conn) -> Instance:
        """An instance said HELLO. ``iid`` is the id it was spawned with, or None for one
        that connected on its own. It stays ``starting`` (no work is routed to it) until
        it says READY, once its ``setup()`` is done (:meth:`ready`). Raises Refused (the
        message goes back to the peer)."""
        st = self.topology.stages.get(stage)
        if st is None:
            raise Refused(f"unknown stage {stage!r}; stages: {', '.join(self.topology.stages)}")
        if iid is None:
            if len(self.active(st)) >= st.max_instances:
                raise Refused(
                    f"stage {stage!r} already has {len(self.active(st))} instances, its max_instances"
                )
            inst = self.new_instance(st.name, launched=False)
            st.target_instances = max(st.target_instances, len(self.active(st)))
        else:
            found = self.instances.get(iid)
            if found is None or found.stage is not st or found.state != InstanceState.STARTING:
                raise Refused(f"unknown instance {iid!r}")
            inst = found
        inst.conn = conn
        inst.pid = pid if isinstance(pid, int) else None
        log.info("instance %s/%d connected (pid %s), setting up", st.name, inst.id, inst.pid)
        return inst

    def ready(self, inst: Instance) -> None:
        """The instance said READY (set up, after WELCOME): route work to it from now on,
        including the retries of a crashed idempotent instance that waited for it."""
        if inst.state != InstanceState.STARTING:
            return  # a repeated or late READY changes nothing
        st = inst.stage
        inst.state = InstanceState.READY
        st.loads[inst.id] = inst.queue_depth
        st.scheduler.add_instance(inst.id)
        log.info("instance %s/%d ready (pid %s)", st.name, inst.id, inst.pid)
        self._notify()
        self._flush_pending(st)

    # ------------------------------------------------------------------ loss and exit

    def exited(self, iid: int, returncode: int | None) -> None:
        """The launcher's report that an instance process ended."""
        inst = self.instances.get(iid)
        if inst is None or inst.ended:
            return
        inst.exit_code = returncode
        if inst.conn is not None:
            # Its reader still has to read what it sent before it died (outputs, ACKs);
            # the connection's EOF follows the exit, and the reader declares it lost then.
            return
        self.lost(inst, f"process exited with code {returncode} before it connected")

    def lost(self, inst: Instance, reason: str, *, quiet: bool = False) -> None:
        """``inst`` exited or its connection broke: see the module docstring.

        A drained instance (no work, no pinned group) that goes away has stopped; so has
        every instance while the runtime shuts down (``quiet``). Anything else crashed.
        """
        if inst.ended:
            return
        st = inst.stage
        quiet = quiet or self.closing
        expected = quiet or (
            inst.state == InstanceState.DRAINING and inst.queue_depth == 0 and inst.open_groups == 0
        )
        registered = inst.state != InstanceState.STARTING
        if not registered and inst.last_error:
            reason = f"{inst.last_error} ({reason})"  # why its set-up failed, as it said
        inst.state = InstanceState.STOPPED if expected else InstanceState.CRASHED
        if not expected:
            inst.last_error = truncate_error(reason)
            log.error("instance %s/%d lost: %s", st.name, inst.id, reason)
            if not registered:
                self._failed_starts.append(inst)
        if inst.id in st.scheduler.instances:
            st.scheduler.remove_instance(inst.id)
        st.loads.pop(inst.id, None)
        what = "stopped" if quiet else "crashed"
        pinned = {
            req.rid
            for req in self.ledger.requests.values()
            for i in req.groups.values()
            if i is inst
        }
        retry: list[bytes] = []
        doomed = set(pinned)
        if inst.retained is not None:  # idempotent: retry what had not started
            for path, frames in inst.retained.items():
                if path in inst.started:
                    doomed.add(struct.unpack_from("<Q", path)[0])
                else:
                    retry.extend(frames)
            inst.retained.clear()
            inst.started.clear()
        else:
            doomed |= set(inst.req_counts)
        for rid in doomed:
            self.ledger.fail(rid, f"stage {st.name!r} instance {inst.id} {what}: {reason}")
        inst.req_counts.clear()
        inst.backlog.clear()
        inst.unblocked.unpark_all()
        inst.queue_depth = inst.credits_in_use = 0
        if inst.conn is not None:
            inst.conn.close()
        self._forget_old(st)
        replacing = (
            not expected
            and inst.launched
            and self.launcher is not None
            and self.nursery is not None
        )
        if replacing:
            assert self.nursery is not None
            replacing = self._note_crash(st)
            if replacing:
                self.nursery.start_soon(self._replace_crashed, st)
        if retry:
            rids = {struct.unpack_from("<Q", f, 10)[0] for f in retry}
            log.info(
                "retrying %d inputs of %d requests from %s/%d on another instance (idempotent stage)",
                len(retry), len(rids), st.name, inst.id,
            )  # fmt: skip
            self._pending.setdefault(st.index, deque()).extend(retry)
            self._flush_pending(st, last_chance=not replacing, reason=reason, lost=inst)
        self._notify()
        self.ledger.settle()

    def _flush_pending(
        self,
        st: Stage,
        *,
        last_chance: bool = False,
        reason: str = "",
        lost: Instance | None = None,
    ) -> None:
        """Hand the retries waiting for ``st`` to its ready instances; with
        ``last_chance``, fail those that no instance can take now."""
        pending = self._pending.get(st.index)
        if not pending:
            return
        requests = self.ledger.requests
        while pending:
            frame = pending[0]
            rid = struct.unpack_from("<Q", frame, 10)[0]
            if rid not in requests:
                pending.popleft()
                continue
            try:
                other = st.instances[st.scheduler.choose(None, st.loads)]
            except NoInstanceError:
                if not last_chance:
                    return  # a replacement is on its way: register() flushes again
                who = f"instance {lost.id} " if lost is not None else ""
                self.ledger.fail(
                    rid,
                    f"stage {st.name!r} {who}crashed ({reason}) and no other instance can retry its work",
                )
                pending.popleft()
                continue
            pending.popleft()
            self.relay.frames_retried += 1
            self.relay.dispatch(other, rid, frame)
        del self._pending[st.index]

    def _note_crash(self, st: Stage) -> bool:
        """Count a crash of ``st``; False once it crashed too often to be replaced."""
        now = trio.current_time()
        st.crash_times = [t for t in st.crash_times if now - t < RESTART_WINDOW] + [now]
        if len(st.crash_times) > MAX_RESTARTS:
            log.error(
                "stage %s crashed %d times within %d s; not restarting it (scale it to retry)",
                st.name, len(st.crash_times), RESTART_WINDOW,
            )  # fmt: skip
            return False
        return True

    async def _replace_crashed(self, st: Stage) -> None:
        """Keep a stage at its target after a crash, as a supervisor would: spawn a
        replacement after a back-off."""
        await trio.sleep(min(8.0, 0.25 * 2 ** (len(st.crash_times) - 1)))
        if (
            self.closing
            or len(self.active(st)) >= st.target_instances
            or len(self.active(st)) >= st.max_instances
            or self.processes() >= self.max_processes
        ):
            self._flush_pending(st, last_chance=not self.active(st), reason="no replacement")
            return
        inst = self.new_instance(st.name)
        log.info("replacing a crashed instance of %s with %s/%d", st.name, st.name, inst.id)
        self.restarts += 1
        await self._spawn(inst)

    async def _spawn(self, inst: Instance) -> None:
        """Start ``inst``'s process; a launcher failure marks it crashed (and forgotten in
        time, like any ended instance)."""
        assert self.launcher is not None
        try:
            await self.launcher.spawn(inst.stage.name, inst.id)
        except Exception as exc:
            inst.state = InstanceState.CRASHED
            inst.last_error = truncate_error(f"could not be started: {exc}")
            log.error("instance %s/%d %s", inst.stage.name, inst.id, inst.last_error)
            self._failed_starts.append(inst)
            self._forget_old(inst.stage)
            self._notify()
            self._flush_pending(
                inst.stage, last_chance=not self.active(inst.stage), reason=str(exc)
            )

    # ------------------------------------------------------------------ start-up and readiness

    def start_all(self) -> None:
        """Spawn the deployment's instances of every stage (at once, in the background)."""
        for st in self.topology.by_index:
            self._check_bounds(st, st.target_instances)
        for st in self.topology.by_index:
            for _ in range(st.target_instances):
                self._start_new(st)

    def _start_new(self, st: Stage) -> None:
        if self.launcher is None or self.nursery is None:
            raise AltoError("this runtime has no launcher: start instances yourself")
        inst = self.new_instance(st.name)
        self.nursery.start_soon(self._spawn, inst)

    async def wait_ready(self, timeout: float = math.inf) -> None:
        """Wait until no instance is starting.

        Raises AltoError naming the instance and its last error when one failed to start
        since the last call, or naming the late ones when ``timeout`` seconds pass first.
        """
        with trio.move_on_after(timeout):
            while True:
                if self._failed_starts:
                    inst, self._failed_starts = self._failed_starts[0], []
                    raise AltoError(
                        f"instance {inst.stage.name}/{inst.id} failed to start: {inst.last_error}"
                    )
                if not any(i.state == InstanceState.STARTING for i in self.instances.values()):
                    return
                await self._changed.wait()
        late = [
            f"{i.stage.name}/{i.id}"
            for i in self.instances.values()
            if i.state == InstanceState.STARTING
        ]
        raise AltoError(f"instances did not register within {timeout} s: {', '.join(late)}")

    # ------------------------------------------------------------------ scaling and draining

    def _check_bounds(self, st: Stage, instances: int) -> None:
        if instances > st.max_instances:
            raise ValueError(
                f"stage {st.name!r} may have at most {st.max_instances} instances (its max_instances); asked for {instances}"
            )
        others = self.processes() - sum(
            1 for i in st.instances.values() if i.launched and not i.ended
        )
        if others + instances > self.max_processes:
            raise ValueError(
                f"the runtime may run at most {self.max_processes} instance processes ([runtime] max_instances); "
                f"{others} run for other stages, so {st.name!r} can have at most {self.max_processes - others}"
            )

    def scale(self, stage: str, instances: int, *, by: str = "operator", reason: str = "") -> int:
        """Set ``stage``'s target to ``instances`` and start or drain instances to reach it.

        Returns at once with the new target: new instances start in the background (their
        records are ``starting`` from now on), surplus ones drain. ``by`` and ``reason``
        go to the scale log. Raises KeyError for an unknown stage, ValueError for a count
        below 1 or past a limit, ScaleConflict (a ValueError) when an operator scales an
        autoscaled stage, AltoError when the runtime has no launcher.
        """
        if stage not in self.topology.stages:
            raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(self.topology.stages)}")
        if not isinstance(instances, int) or isinstance(instances, bool) or instances < 1:
            raise ValueError(f"instances must be an integer >= 1, got {instances!r}")
        policy = self.autoscaled.get(stage)
        if policy is not None and by != "autoscaler":
            raise ScaleConflict(
                f"stage {stage!r} is autoscaled between {policy.min} and {policy.max} instances; "
                f"change [stages.{stage}.autoscale] in the deployment file to scale it by hand"
            )
        st = self.topology.stages[stage]
        self._check_bounds(st, instances)
        active = self.active(st)
        if instances > len(active) and (self.launcher is None or self.nursery is None):
            raise AltoError("this runtime has no launcher: start instances yourself")
        if instances != st.target_instances or instances != len(active):
            self.scale_log.append(
                ScaleEvent(
                    trio.current_time(), stage, len(active), instances, by, reason or "asked"
                )
            )
            log.info(
                "scaling %s from %d to %d instances (%s: %s)",
                stage, len(active), instances, by, reason or "asked",
            )  # fmt: skip
        st.target_instances = instances
        if instances > len(active):
            for _ in range(instances - len(active)):
                self.scale_events += 1
                self._start_new(st)
        elif instances < len(active):
            # Drain the instances with the least pinned work first.
            victims = sorted(
                active,
                key=lambda i: (i.state == InstanceState.READY, i.open_groups, i.queue_depth),
            )
            for inst in victims[: len(active) - instances]:
                self.scale_events += 1
                self._begin_drain(inst)
        return instances

    def drain(self, instance_id: int) -> None:
        """Drain one instance and lower its stage's target by one.

        Raises KeyError for an unknown instance, ValueError for the last instance of its
        stage (scale the stage up first).
        """
        inst = self.instances.get(instance_id)
        if inst is None:
            raise KeyError(f"unknown instance {instance_id}")
        if inst.active:
            active = self.active(inst.stage)
            policy = self.autoscaled.get(inst.stage.name)
            if policy is not None and len(active) <= policy.min:
                raise ScaleConflict(
                    f"instance {instance_id} is one of the {policy.min} that autoscaled stage "
                    f"{inst.stage.name!r} keeps at least"
                )
            if len(active) <= 1:
                raise ValueError(
                    f"instance {instance_id} is the last of stage {inst.stage.name!r}; "
                    "scale the stage up before draining it"
                )
            self.scale_events += 1
            self.scale_log.append(
                ScaleEvent(
                    trio.current_time(),
                    inst.stage.name,
                    len(active),
                    len(active) - 1,
                    "operator",
                    f"drained instance {instance_id}",
                )
            )
            inst.stage.target_instances = len(active) - 1
            self._begin_drain(inst)

    def _begin_drain(self, inst: Instance) -> None:
        st = inst.stage
        inst.state = InstanceState.DRAINING
        if inst.id in st.scheduler.instances:
            st.scheduler.remove_instance(inst.id)
        log.info(
            "draining instance %s/%d (%d pinned groups, depth %d)",
            st.name, inst.id, inst.open_groups, inst.queue_depth,
        )  # fmt: skip
        self._notify()
        self.maybe_finish_drain(inst)

    def maybe_finish_drain(self, inst: Instance) -> None:
        """A draining instance with no work and no pinned group left gets STOP."""
        if inst.state == InstanceState.DRAINING and inst.queue_depth == 0 and inst.open_groups == 0:
            if inst.conn is not None:
                inst.conn.send(encode(FrameKind.STOP, [0]))
            if self.launcher is not None:
                self.launcher.stop(inst.id)

    # ------------------------------------------------------------------ shutdown

    def begin_shutdown(self) -> None:
        """The runtime is about to stop its instances: their exits are not crashes."""
        self.closing = True

    async def shutdown(self) -> None:
        """Stop every instance through the launcher (shielded: it runs while cancelled)."""
        self.begin_shutdown()
        if self.launcher is not None:
            with trio.CancelScope(shield=True):
                await self.launcher.shutdown()
