"""Liveness and readiness for load balancers and Kubernetes probes (sans-IO).

- Liveness (``GET /healthz``): the process serves HTTP. It never looks at the pipeline, so a
  stage that is down does not get the whole server restarted by a liveness probe.
- Readiness (``GET /readyz``): every stage has at least one READY instance, so a request
  admitted now can pass through the whole pipeline. A stage whose instances are all
  starting, draining or crashed (waiting for its replacement) makes the server not ready:
  a load balancer sends new requests elsewhere until it is back.

:func:`readiness` decides from one frozen statistics snapshot, so it is tested without an
app, and the HTTP handler only renders its answer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..dataplane._stats import InstanceState, InstanceStatistics, RuntimeStatistics

__all__ = ["Readiness", "StageNotReady", "readiness"]


@dataclass(frozen=True, slots=True)
class StageNotReady:
    """A stage without a READY instance, and what is known about why."""

    stage: str
    target_instances: int
    states: dict[str, int]  # instances that are not stopped, by state
    reason: str
    last_error: str | None  # the most recent error of one of its instances, if any

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "target_instances": self.target_instances,
            "instances": dict(self.states),
            "reason": self.reason,
            "last_error": self.last_error,
        }


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    ready_instances: dict[str, int]  # READY instances per stage
    not_ready: tuple[StageNotReady, ...]

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": "ready" if self.ready else "not ready",
            "ready_instances": dict(self.ready_instances),
        }
        if not self.ready:
            body["stages"] = [s.to_json() for s in self.not_ready]
        return body


def _why(target: int, states: dict[str, int], error: tuple[int, str] | None) -> str:
    if not states:
        return f"no instances (target {target})"
    parts = []
    for state, what in (
        (InstanceState.STARTING, "starting"),
        (InstanceState.DRAINING, "draining"),
        (InstanceState.CRASHED, "crashed"),
    ):
        n = states.get(str(state), 0)
        if n:
            parts.append(f"{n} instance{'s' if n != 1 else ''} {what}")
    reason = ", ".join(parts)
    if error is not None:
        reason += f"; instance {error[0]}: {error[1]}"
    return reason


def readiness(stats: RuntimeStatistics) -> Readiness:
    """Whether every stage of ``stats`` has a READY instance, and, for each stage that has
    none, its instances' states and the latest error known (crashed or failed to start)."""
    by_stage: dict[str, list[InstanceStatistics]] = {}
    for inst in stats.instances:
        if inst.state is not InstanceState.STOPPED:
            by_stage.setdefault(inst.stage, []).append(inst)
    ready_instances: dict[str, int] = {}
    not_ready = []
    for stage in stats.stages:
        instances = by_stage.get(stage.name, [])
        states = Counter(str(i.state) for i in instances)
        ready_instances[stage.name] = states.get(str(InstanceState.READY), 0)
        if ready_instances[stage.name]:
            continue
        # The newest instance with an error says most about the stage now.
        errors = [(i.instance_id, i.last_error) for i in instances if i.last_error]
        latest = max(errors) if errors else None
        not_ready.append(
            StageNotReady(
                stage=stage.name,
                target_instances=stage.target_instances,
                states=dict(sorted(states.items())),
                reason=_why(stage.target_instances, dict(states), latest),
                last_error=latest[1] if latest is not None else None,
            )
        )
    return Readiness(not not_ready, ready_instances, tuple(not_ready))
