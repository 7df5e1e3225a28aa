"""Autoscaling per stage: instances follow the stage's queue depth.

A stage with an ``[stages.NAME.autoscale]`` table in the deployment file is scaled by the
runtime itself, through the same path as an operator's ``scale`` (so open groups never
move or split, a draining instance finishes its pinned work, and the stage's
``max_instances`` and the runtime's cap hold)::

    [stages.queries.autoscale]
    min = 1                    # never fewer instances
    max = 6                    # never more (also bounded by max_instances)
    target_queue_depth = 4     # wanted frames in flight per instance (see below)
    up_delay = 2.0             # seconds the stage must want more before it grows
    down_delay = 30.0          # seconds it must want fewer before it shrinks

The signal is the stage's *queue depth*: frames routed to its instances and not yet
acknowledged, summed over its active instances. For an LM stage that is the inputs
queued or generating; it rises as soon as work arrives, before latency does. Every
``interval`` (0.5 s) the autoscaler computes the wanted number of instances,
``ceil(depth / target_queue_depth)`` clamped to ``min..max``, and

* scales up to it once the stage has wanted more than it has for ``up_delay`` seconds
  (to the lowest count wanted during that time: a burst shorter than the delay costs
  nothing);
* scales down once it has wanted fewer for ``down_delay`` seconds, to the highest count
  wanted during that time (as Kubernetes' HPA stabilisation window does), so that a
  dip does not drain instances that the next second needs again.

Manual scaling of an autoscaled stage is refused (409 over HTTP, naming the autoscale
range): two controllers fighting over one number would make neither's decisions
readable. Change the deployment file to take a stage off autoscaling.

Every decision is a scale event with its reason (``statistics().scale_log``, the SSE
stream, ``/metrics`` and the log).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import trio

from .._config import AutoscaleConfig
from ._topology import Stage

log = logging.getLogger("alto.autoscaler")

__all__ = ["AutoscalePolicy", "Autoscaler"]

INTERVAL = 0.5  # seconds between decisions

ScaleFunction = Callable[[str, int, str], object]
"""``scale(stage, instances, reason)``: the supervisor's scale, with the reason logged."""


AutoscalePolicy = AutoscaleConfig  # one stage's settings, ``[stages.NAME.autoscale]``


def wanted(policy: AutoscalePolicy, depth: int) -> int:
    """Instances wanted for a total queue depth ``depth``."""
    return max(policy.min, min(policy.max, math.ceil(depth / policy.target_queue_depth)))


class _StageState:
    __slots__ = ("down_since", "down_wanted", "up_since", "up_wanted")

    def __init__(self) -> None:
        self.up_since: float | None = None
        self.up_wanted = 0  # the lowest count wanted since up_since
        self.down_since: float | None = None
        self.down_wanted = 0  # the highest count wanted since down_since


class Autoscaler:
    """Decides, per autoscaled stage, when to call ``scale(stage, n, reason)``."""

    def __init__(self, policies: dict[str, AutoscalePolicy], stages: dict[str, Stage]) -> None:
        self.policies = policies
        self.stages = stages
        self._state = {name: _StageState() for name in policies}

    def decide(self, name: str, now: float, current: int, depth: int) -> tuple[int, str] | None:
        """The new target for stage ``name`` (and why), or None to leave it. ``current``:
        its active instances; ``depth``: their summed queue depth. Pure: no I/O."""
        policy = self.policies[name]
        state = self._state[name]
        want = wanted(policy, depth)
        if current < policy.min or current > policy.max:
            state.up_since = state.down_since = None
            target = max(policy.min, min(policy.max, current))
            return target, f"outside its autoscale range {policy.min}..{policy.max}"
        if want > current:
            state.down_since = None
            if state.up_since is None:
                state.up_since, state.up_wanted = now, want
            else:
                state.up_wanted = min(state.up_wanted, want)
            if now - state.up_since >= policy.up_delay:
                state.up_since = None
                target = max(state.up_wanted, current + 1)
                return target, (
                    f"queue depth {depth} over {current} instances is above the target "
                    f"{policy.target_queue_depth:g} per instance for {policy.up_delay:g} s"
                )
        elif want < current:
            state.up_since = None
            if state.down_since is None:
                state.down_since, state.down_wanted = now, want
            else:
                state.down_wanted = max(state.down_wanted, want)
            if now - state.down_since >= policy.down_delay:
                state.down_since = None
                return state.down_wanted, (
                    f"queue depth {depth} over {current} instances has been below the target "
                    f"{policy.target_queue_depth:g} per instance for {policy.down_delay:g} s"
                )
        else:
            state.up_since = state.down_since = None
        return None

    async def run(self, scale: ScaleFunction, *, interval: float = INTERVAL) -> None:
        """Decide every ``interval`` seconds until cancelled; a failing scale is logged and
        tried again at the next decision."""
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for name in self.policies:
                st = self.stages[name]
                active = [i for i in st.instances.values() if i.active]
                depth = sum(i.queue_depth for i in active)
                decision = self.decide(name, now, len(active), depth)
                if decision is None:
                    continue
                target, reason = decision
                try:
                    scale(name, target, reason)
                except (ValueError, LookupError) as exc:
                    log.warning("autoscaling %s to %d failed: %s", name, target, exc)
