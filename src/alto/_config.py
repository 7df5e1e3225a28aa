"""The paper's two configuration files, read with tomllib and validated strictly.

A *pipeline file* names the stages, their entry points, their input and output queues with
the Protocol Buffers message type of each queue, resource needs, and which stages fan out
and which aggregate at what level::

    [pipeline]
    name = "demo"
    input = "numbers"            # the ingress queue: a request is one message of its type
    outputs = ["totals"]         # sink queues: what reaches them streams back to the client

    [queues.numbers]
    type = "alto.examples.demo_pb2:Number"   # module:MessageClass

    [stages.generate]
    entry = "alto.examples.demo:generate"    # module:callable (function or class)
    inputs = ["numbers"]
    outputs = ["items"]
    fanout = true                # each output gets a new id appended to its key path

    [stages.total]
    entry = "alto.examples.demo:Total"
    inputs = ["squares"]
    outputs = ["totals"]
    stateful = true
    aggregate_level = 1          # one group per key-path prefix of length 1 (the request)

A *deployment file* says how many instances of each stage run, and the runtime's limits::

    [runtime]
    credits = 64
    [stages.square]
    instances = 3

Key paths: the ingress gives every request the path ``[request]`` (depth 1); each fan-out
stage adds one level. The depth of the frames entering a stage is therefore fixed by the
graph, and ``aggregate_level`` must lie in ``1..depth``. Anything wrong is a
:class:`ConfigError` naming file, key and the allowed values; nothing is silently ignored.
"""

from __future__ import annotations

import importlib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import ConfigError

__all__ = [
    "DeploymentConfig",
    "PipelineConfig",
    "QueueConfig",
    "RuntimeLimits",
    "StageConfig",
    "StageDeployment",
    "TLSConfig",
    "load_deployment",
    "load_pipeline",
    "resolve",
]

BACKENDS = ("trio", "asyncio")


@dataclass(frozen=True, slots=True)
class QueueConfig:
    name: str
    type: str  # "module:MessageClass"
    # "module:function": message -> the prompt the LM stage reading this queue will run;
    # writers derive the frame's prompt key from it (see alto._stage.prefix_key)
    prompt: str | None = None


@dataclass(frozen=True, slots=True)
class StageConfig:
    name: str
    entry: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    fanout: bool = False
    stateful: bool = False
    aggregate_level: int | None = None
    scheduler: str = "least-outstanding"
    scheduler_options: Mapping[str, Any] = field(default_factory=dict)
    gpus: int = 0
    idempotent: bool = False
    backend: str = "trio"
    concurrency: int = 64
    options: Mapping[str, Any] = field(default_factory=dict)
    # What one instance needs from a cluster launcher (Ray): CPUs (None: the launcher's
    # default) and custom resources by name; GPUs are ``gpus``. The local launcher ignores them.
    cpus: float | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    input_depth: int = 1  # key-path depth of the frames entering this stage (computed)


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    name: str
    path: str
    input: str
    outputs: tuple[str, ...]
    queues: Mapping[str, QueueConfig]
    stages: Mapping[str, StageConfig]  # in topological order
    consumer: Mapping[str, str]  # queue -> the stage that reads it (sinks absent)
    producers: Mapping[str, tuple[str, ...]]  # queue -> stages that write it

    def upstream(self, stage: str) -> frozenset[str]:
        """Every stage from which frames can reach ``stage`` (not itself)."""
        seen: set[str] = set()
        todo = [stage]
        while todo:
            s = todo.pop()
            for q in self.stages[s].inputs:
                for p in self.producers.get(q, ()):
                    if p not in seen:
                        seen.add(p)
                        todo.append(p)
        return frozenset(seen)

    def feeds_fanout(self, queue: str) -> bool:
        """Whether frames written to ``queue`` reach a fan-out stage keeping their key path
        (through stateless, non-fan-out stages only). Such a queue must not receive two
        messages with one key path: the fan-out stage would give both the same child ids."""
        seen: set[str] = set()
        todo = [queue]
        while todo:
            q = todo.pop()
            st = self.consumer.get(q)
            if st is None or st in seen:
                continue
            seen.add(st)
            cfg = self.stages[st]
            if cfg.fanout:
                return True
            if not cfg.stateful:
                todo.extend(cfg.outputs)
        return False

    def edges(self) -> tuple[tuple[str, str, str], ...]:
        """(from stage or "ingress", queue, to stage or "sink") for every queue."""
        out: list[tuple[str, str, str]] = []
        for q in self.queues:
            dst = self.consumer.get(q, "sink")
            srcs = self.producers.get(q) or ("ingress",)
            out.extend((s, q, dst) for s in srcs)
        return tuple(out)


def default_max_instances() -> int:
    """The default cap on instance processes: sized to the machine, generous enough for
    the paper's 16-instance deployment on a 2-core machine (each instance is mostly
    waiting on a GPU or a socket), bounded so that a scale request cannot fork-bomb it."""
    return max(32, 8 * (os.cpu_count() or 1))


# Upper bounds of every number a deployment file (or the API) may set. A typo of three
# zeros must be an error, not a runtime that tries to honour it.
MAX_INSTANCES = 4096
MAX_CREDITS = 1 << 20
MAX_INFLIGHT = 1 << 20
MAX_BACKLOG = 1 << 24
MAX_FRAME_SIZE = 1 << 30
MAX_TIMEOUT_SECONDS = 24 * 3600.0
MAX_CPUS = 1024.0  # per instance
MAX_RESOURCE = 1e6  # per instance, of one custom resource
PLACEMENTS = ("pack", "spread")


@dataclass(frozen=True, slots=True)
class RuntimeLimits:
    credits: int = 64
    max_inflight_requests: int = 1024
    backlog_limit: int = 4096
    max_frame_size: int = 16 * 1024 * 1024
    stop_timeout: float = 5.0
    max_instances: int = field(default_factory=default_max_instances)  # instance processes
    request_timeout: float | None = None  # default deadline of a request, seconds
    trace_sample_rate: float = 1.0  # share of requests traced (see dataplane._tracing)


@dataclass(frozen=True, slots=True)
class StageDeployment:
    instances: int = 1
    credits: int | None = None
    max_instances: int | None = None  # None: the runtime's max_instances
    # Where instances run, for cluster launchers: CPUs per instance (over the pipeline's),
    # custom resources (merged over the pipeline's: pin a stage to a node that has one),
    # and "pack" (next to the stage's other instances) or "spread" (across nodes).
    cpus: float | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    placement: str | None = None
    autoscale: AutoscaleConfig | None = None  # [stages.NAME.autoscale]
    # Options of the instance in slot k merged over the pipeline's stage options (tables
    # merge key by key, at every depth): e.g. one engine server's base_url per instance.
    instance_options: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class AutoscaleConfig:
    """``[stages.NAME.autoscale]``: see ``alto.dataplane._autoscaler``."""

    min: int
    max: int
    target_queue_depth: float = 4.0
    up_delay: float = 2.0
    down_delay: float = 30.0


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """The runtime's TLS certificate chain and private key (PEM files) for ``--tcp``."""

    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class DeploymentConfig:
    path: str
    runtime: RuntimeLimits
    stages: Mapping[str, StageDeployment]
    launcher: str = "local"  # [runtime] launcher: a name in the alto.launchers group
    launcher_options: Mapping[str, Any] = field(default_factory=dict)  # [launcher], checked by it
    tls: TLSConfig | None = None

    def instances(self, stage: str) -> int:
        return self.stages[stage].instances if stage in self.stages else 1

    def credits(self, stage: str) -> int:
        d = self.stages.get(stage)
        return d.credits if d is not None and d.credits is not None else self.runtime.credits

    def resources(self, stage: StageConfig) -> dict[str, float]:
        """What one instance of ``stage`` asks of a cluster: ``CPU`` and ``GPU`` (when
        set) and custom resources, the deployment's over the pipeline's."""
        d = self.stages.get(stage.name, StageDeployment())
        out: dict[str, float] = {}
        cpus = d.cpus if d.cpus is not None else stage.cpus
        if cpus is not None:
            out["CPU"] = cpus
        if stage.gpus:
            out["GPU"] = float(stage.gpus)
        out.update(stage.resources)
        out.update(d.resources)
        return out

    def placement(self, stage: str) -> str | None:
        d = self.stages.get(stage)
        return d.placement if d is not None else None

    def instance_options(self, stage: StageConfig, slot: int) -> dict[str, Any]:
        """The options of ``stage``'s instance in ``slot``: the pipeline's options, with
        the deployment's ``instance_options[slot]`` merged over them (if there is one)."""
        d = self.stages.get(stage.name)
        base = dict(stage.options)
        if d is None or slot >= len(d.instance_options):
            return base
        return _merge(base, d.instance_options[slot])

    def max_instances(self, stage: str) -> int:
        d = self.stages.get(stage)
        if d is not None and d.max_instances is not None:
            return min(d.max_instances, self.runtime.max_instances)
        return self.runtime.max_instances


class _Table:
    """A TOML table being read: tracks the keys used and rejects the rest."""

    def __init__(self, path: str, prefix: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, prefix or None, f"expected a table, got {type(data).__name__}")
        self.path, self.prefix, self.data = path, prefix, data

    def key(self, k: str) -> str:
        return f"{self.prefix}.{k}" if self.prefix else k

    def check_keys(self, allowed: tuple[str, ...]) -> None:
        for k in self.data:
            if k not in allowed:
                raise ConfigError(
                    self.path, self.key(k), f"unknown key; allowed: {', '.join(allowed)}"
                )

    def get(self, k: str, typ: type | tuple[type, ...], default: Any = ..., what: str = "") -> Any:
        if k not in self.data:
            if default is ...:
                raise ConfigError(self.path, self.key(k), "missing (required)")
            return default
        v = self.data[k]
        ok = isinstance(v, typ) and not (isinstance(v, bool) and typ in (int, (int, float)))
        if not ok:
            names = what or (
                typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            )
            raise ConfigError(self.path, self.key(k), f"expected {names}, got {v!r}")
        return v

    def strings(self, k: str, default: Any = ...) -> tuple[str, ...]:
        v = self.get(k, list, default, what="a list of strings")
        if not all(isinstance(x, str) for x in v):
            raise ConfigError(self.path, self.key(k), f"expected a list of strings, got {v!r}")
        return tuple(v)

    def table(self, k: str, default: Any = ...) -> dict[str, Any]:
        return dict(self.get(k, dict, default, what="a table"))

    def positive(
        self, k: str, default: Any = ..., minimum: int = 1, maximum: int | None = None
    ) -> Any:
        """An int in ``minimum..maximum`` (or the default, which may be None)."""
        v = self.get(k, int, default)
        if v is not None and v < minimum:
            raise ConfigError(self.path, self.key(k), f"must be >= {minimum}, got {v}")
        if v is not None and maximum is not None and v > maximum:
            raise ConfigError(
                self.path,
                self.key(k),
                f"must be at most {maximum}, got {v}; allowed: {minimum}..{maximum}",
            )
        return v

    def amount(self, k: str, default: Any = ..., maximum: float = MAX_RESOURCE) -> Any:
        """A resource quantity: a number in ``0..maximum``, whole above 1 (a cluster
        scheduler such as Ray divides only single units)."""
        v = self.get(k, (int, float), default)
        if v is None:
            return None
        v = float(v)
        if not 0 <= v <= maximum or (v > 1 and not v.is_integer()):
            raise ConfigError(
                self.path,
                self.key(k),
                f"must be a number in 0..{maximum:g}, a whole number above 1, got {v:g}",
            )
        return v

    def resources(self, k: str) -> dict[str, float]:
        """A table of custom resource names to quantities (CPUs and GPUs have their keys)."""
        t = _Table(self.path, self.key(k), self.get(k, dict, {}, what="a table"))
        out: dict[str, float] = {}
        for name in t.data:
            if not name or name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ConfigError(
                    self.path,
                    t.key(name),
                    "not a custom resource name (use cpus = and gpus = for CPUs and GPUs)",
                )
            out[name] = t.amount(name)
        return out

    def fraction(self, k: str, default: float) -> float:
        """A number in [0, 1]."""
        v = float(self.get(k, (int, float), default))
        if not 0.0 <= v <= 1.0:
            raise ConfigError(self.path, self.key(k), f"must be between 0 and 1, got {v}")
        return v

    def seconds(self, k: str, default: float, maximum: float = MAX_TIMEOUT_SECONDS) -> float:
        """A positive number of seconds, at most ``maximum``."""
        v = float(self.get(k, (int, float), default))
        if not 0 < v <= maximum:
            raise ConfigError(
                self.path,
                self.key(k),
                f"must be a positive number of seconds up to {maximum:g}, got {v}",
            )
        return v


def _read(path: str | Path) -> tuple[str, dict[str, Any]]:
    p = str(path)
    try:
        with open(p, "rb") as f:
            return p, tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(p, None, "file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(p, None, f"not valid TOML: {exc}") from exc


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline file. Raises ConfigError."""
    p, data = _read(path)
    top = _Table(p, "", data)
    top.check_keys(("pipeline", "queues", "stages"))
    meta = _Table(p, "pipeline", top.get("pipeline", dict, what="a table"))
    meta.check_keys(("name", "input", "outputs"))
    name = meta.get("name", str)
    if not name or "/" in name:
        raise ConfigError(p, "pipeline.name", f"must be a non-empty name without '/', got {name!r}")
    input_q = meta.get("input", str)
    outputs = meta.strings("outputs")
    if not outputs:
        raise ConfigError(p, "pipeline.outputs", "must name at least one sink queue")

    queues: dict[str, QueueConfig] = {}
    for qname, qdata in top.table("queues").items():
        t = _Table(p, f"queues.{qname}", qdata)
        t.check_keys(("type", "prompt"))
        typ = t.get("type", str)
        if ":" not in typ:
            raise ConfigError(p, t.key("type"), f"expected 'module:MessageClass', got {typ!r}")
        prompt = t.get("prompt", str, None)
        if prompt is not None and ":" not in prompt:
            raise ConfigError(p, t.key("prompt"), f"expected 'module:function', got {prompt!r}")
        try:
            qname.encode("ascii")
        except UnicodeEncodeError:
            raise ConfigError(p, f"queues.{qname}", "queue names must be ASCII") from None
        queues[qname] = QueueConfig(qname, typ, prompt)
    allowed_q = ", ".join(queues) or "(none declared)"

    def need_queue(key: str, q: str) -> None:
        if q not in queues:
            raise ConfigError(p, key, f"unknown queue {q!r}; declared queues: {allowed_q}")

    need_queue("pipeline.input", input_q)
    for q in outputs:
        need_queue("pipeline.outputs", q)

    raw: dict[str, dict[str, Any]] = {}
    consumer: dict[str, str] = {}
    producers: dict[str, list[str]] = {}
    stage_keys = (
        "entry", "inputs", "outputs", "fanout", "stateful", "aggregate_level", "scheduler",
        "scheduler_options", "gpus", "idempotent", "backend", "concurrency", "options",
        "cpus", "resources",
    )  # fmt: skip
    stages_table = top.table("stages")
    if not stages_table:
        raise ConfigError(p, "stages", "a pipeline needs at least one stage")
    for sname, sdata in stages_table.items():
        t = _Table(p, f"stages.{sname}", sdata)
        t.check_keys(stage_keys)
        entry = t.get("entry", str)
        if ":" not in entry:
            raise ConfigError(p, t.key("entry"), f"expected 'module:callable', got {entry!r}")
        inputs = t.strings("inputs")
        if not inputs:
            raise ConfigError(p, t.key("inputs"), "a stage needs at least one input queue")
        outs = t.strings("outputs", [])
        for q in inputs:
            need_queue(t.key("inputs"), q)
            if q in outputs:
                raise ConfigError(p, t.key("inputs"), f"queue {q!r} is a pipeline output (sink)")
            if q in consumer:
                raise ConfigError(
                    p, t.key("inputs"),
                    f"queue {q!r} is already read by stage {consumer[q]!r}; a queue feeds one stage",
                )  # fmt: skip
            consumer[q] = sname
        for q in outs:
            need_queue(t.key("outputs"), q)
            if q == input_q:
                raise ConfigError(p, t.key("outputs"), f"queue {q!r} is the pipeline's input")
            producers.setdefault(q, []).append(sname)
        stateful = t.get("stateful", bool, False)
        level = t.positive("aggregate_level", None, maximum=255)
        if level is not None and not stateful:
            raise ConfigError(
                p, t.key("aggregate_level"), "only stateful stages aggregate; set stateful = true"
            )
        if stateful and level is None:
            raise ConfigError(
                p, t.key("aggregate_level"), "missing: a stateful stage needs its aggregation level"
            )
        if stateful and t.get("idempotent", bool, False):
            raise ConfigError(
                p,
                t.key("idempotent"),
                "a stateful stage cannot be retried elsewhere: its group state dies with the instance",
            )
        backend = t.get("backend", str, "trio")
        if backend not in BACKENDS:
            raise ConfigError(
                p, t.key("backend"), f"got {backend!r}; allowed: {', '.join(BACKENDS)}"
            )
        raw[sname] = dict(
            name=sname,
            entry=entry,
            inputs=inputs,
            outputs=outs,
            fanout=t.get("fanout", bool, False),
            stateful=stateful,
            aggregate_level=level,
            scheduler=t.get(
                "scheduler", str, "consistent-hash" if stateful else "least-outstanding"
            ),
            scheduler_options=t.table("scheduler_options", {}),
            gpus=t.positive("gpus", 0, minimum=0, maximum=1024),
            idempotent=t.get("idempotent", bool, False),
            backend=backend,
            concurrency=t.positive("concurrency", 64, maximum=65536),
            options=t.table("options", {}),
            cpus=t.amount("cpus", None, maximum=MAX_CPUS),
            resources=t.resources("resources"),
        )

    if input_q not in consumer:
        raise ConfigError(p, "pipeline.input", f"no stage reads the input queue {input_q!r}")
    for q in queues:
        if q != input_q and q not in producers:
            raise ConfigError(p, f"queues.{q}", "no stage writes this queue")
        if q not in outputs and q != input_q and q not in consumer:
            raise ConfigError(
                p, f"queues.{q}", "no stage reads this queue and it is not a pipeline output"
            )

    # Topological order and key-path depths (Kahn's algorithm); a leftover stage is a cycle.
    indeg = {s: 0 for s in raw}
    succ: dict[str, set[str]] = {s: set() for s in raw}
    for s, d in raw.items():
        for q in d["outputs"]:
            if q in consumer:
                succ[s].add(consumer[q])
    for s in raw:
        for t2 in succ[s]:
            indeg[t2] += 1
    order = [s for s in raw if indeg[s] == 0]
    i = 0
    while i < len(order):
        for t2 in sorted(succ[order[i]]):
            indeg[t2] -= 1
            if indeg[t2] == 0:
                order.append(t2)
        i += 1
    if len(order) != len(raw):
        cyc = sorted(s for s in raw if indeg[s] > 0)
        raise ConfigError(p, "stages", f"the stages {', '.join(cyc)} form a cycle")

    depth_of_queue: dict[str, int] = {input_q: 1}
    stages: dict[str, StageConfig] = {}
    for s in order:
        d = raw[s]
        depths = {depth_of_queue[q] for q in d["inputs"] if q in depth_of_queue}
        missing = [q for q in d["inputs"] if q not in depth_of_queue]
        if missing:  # an input queue with no producer upstream of the ingress
            raise ConfigError(
                p, f"stages.{s}.inputs", f"queue {missing[0]!r} is never reached from the input"
            )
        if len(depths) != 1:
            raise ConfigError(
                p, f"stages.{s}.inputs",
                f"inputs carry key paths of different depths {sorted(depths)}; "
                "merge queues only at the same fan-out level",
            )  # fmt: skip
        depth = depths.pop()
        level = d["aggregate_level"]
        if level is not None and level > depth:
            raise ConfigError(
                p, f"stages.{s}.aggregate_level",
                f"level {level} is not produced upstream: frames entering {s!r} carry key paths "
                f"of depth {depth} (the request plus {depth - 1} fan-out level(s)); allowed: 1..{depth}",
            )  # fmt: skip
        if d["fanout"]:
            feeds = [(q, p_) for q in d["inputs"] for p_ in producers.get(q, ("ingress",))]
            if len(feeds) > 1:
                raise ConfigError(
                    p,
                    f"stages.{s}.inputs",
                    f"a fan-out stage reads one queue written by one stage; {s!r} is fed by "
                    + ", ".join(f"{src} via {q}" for q, src in feeds)
                    + " (child ids are counted per input key path; inputs from two producers could share one)",
                )
        # A stateful stage writes with the group's key path (depth = its level).
        base = level if level is not None else depth
        out_depth = base + 1 if d["fanout"] else base
        for q in d["outputs"]:
            if depth_of_queue.setdefault(q, out_depth) != out_depth:
                raise ConfigError(
                    p, f"stages.{s}.outputs", f"queue {q!r} is written at two fan-out depths"
                )
        stages[s] = StageConfig(**d, input_depth=depth)

    return PipelineConfig(
        name=name,
        path=p,
        input=input_q,
        outputs=outputs,
        queues=queues,
        stages=stages,
        consumer=consumer,
        producers={q: tuple(v) for q, v in producers.items()},
    )


def load_deployment(path: str | Path | None, pipeline: PipelineConfig) -> DeploymentConfig:
    """Read a deployment file (``None``: one instance of every stage). Raises ConfigError."""
    if path is None:
        return DeploymentConfig("<defaults>", RuntimeLimits(), {})
    p, data = _read(path)
    top = _Table(p, "", data)
    top.check_keys(("runtime", "stages", "launcher", "tls"))
    rt = _Table(p, "runtime", top.table("runtime", {}))
    rt.check_keys(
        (
            "credits", "max_inflight_requests", "backlog_limit", "max_frame_size",
            "stop_timeout", "max_instances", "launcher", "request_timeout",
            "trace_sample_rate",
        )
    )  # fmt: skip
    d = RuntimeLimits()
    limits = RuntimeLimits(
        credits=rt.positive("credits", d.credits, maximum=MAX_CREDITS),
        max_inflight_requests=rt.positive(
            "max_inflight_requests", d.max_inflight_requests, maximum=MAX_INFLIGHT
        ),
        backlog_limit=rt.positive("backlog_limit", d.backlog_limit, maximum=MAX_BACKLOG),
        max_frame_size=rt.positive(
            "max_frame_size", d.max_frame_size, minimum=1024, maximum=MAX_FRAME_SIZE
        ),
        stop_timeout=rt.seconds("stop_timeout", d.stop_timeout, maximum=3600.0),
        max_instances=rt.positive("max_instances", d.max_instances, maximum=MAX_INSTANCES),
        request_timeout=(
            rt.seconds("request_timeout", 1.0) if "request_timeout" in rt.data else None
        ),
        trace_sample_rate=rt.fraction("trace_sample_rate", d.trace_sample_rate),
    )
    stages: dict[str, StageDeployment] = {}
    for sname, sdata in top.table("stages", {}).items():
        if sname not in pipeline.stages:
            raise ConfigError(
                p, f"stages.{sname}",
                f"no such stage in {pipeline.path}; stages: {', '.join(pipeline.stages)}",
            )  # fmt: skip
        t = _Table(p, f"stages.{sname}", sdata)
        t.check_keys(
            (
                "instances",
                "credits",
                "max_instances",
                "cpus",
                "resources",
                "placement",
                "autoscale",
                "instance_options",
            )
        )
        cap = t.positive("max_instances", None, maximum=limits.max_instances)
        n = t.positive("instances", 1, maximum=cap if cap is not None else limits.max_instances)
        placement = t.get("placement", str, None)
        if placement is not None and placement not in PLACEMENTS:
            raise ConfigError(
                p, t.key("placement"), f"got {placement!r}; allowed: {', '.join(PLACEMENTS)}"
            )
        stages[sname] = StageDeployment(
            n,
            t.positive("credits", None, maximum=MAX_CREDITS),
            cap,
            cpus=t.amount("cpus", None, maximum=MAX_CPUS),
            resources=t.resources("resources"),
            placement=placement,
            autoscale=_autoscale(p, sname, t, n, cap or limits.max_instances),
            instance_options=_instance_options(p, t, cap or limits.max_instances),
        )
    total = sum(stages[s].instances if s in stages else 1 for s in pipeline.stages)
    if total > limits.max_instances:
        raise ConfigError(
            p,
            "stages",
            f"the deployment asks for {total} instances in all, more than runtime.max_instances = {limits.max_instances}",
        )
    launcher = rt.get("launcher", str, "local")
    if not launcher:
        raise ConfigError(p, "runtime.launcher", 'must name a launcher, e.g. "local" or "ray"')
    tls = None
    if "tls" in top.data:
        t = _Table(p, "tls", top.table("tls"))
        t.check_keys(("cert", "key"))
        here = Path(p).parent  # relative paths are relative to the deployment file
        tls = TLSConfig(str(here / t.get("cert", str)), str(here / t.get("key", str)))
    return DeploymentConfig(p, limits, stages, launcher, dict(top.table("launcher", {})), tls)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``: tables key by key at every depth, anything else
    replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _instance_options(p: str, t: _Table, cap: int) -> tuple[Mapping[str, Any], ...]:
    """``instance_options``: a list of tables, one per instance slot."""
    raw = t.get("instance_options", list, [], what="a list of tables (one per instance)")
    if len(raw) > cap:
        raise ConfigError(
            p,
            t.key("instance_options"),
            f"{len(raw)} entries, but the stage may have at most {cap} instances",
        )
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(
                p, f"{t.key('instance_options')}[{i}]", f"expected a table, got {item!r}"
            )
    return tuple(dict(item) for item in raw)


def _autoscale(p: str, stage: str, t: _Table, instances: int, cap: int) -> AutoscaleConfig | None:
    """The stage's ``autoscale`` table, checked against its other limits."""
    if "autoscale" not in t.data:
        return None
    a = _Table(p, t.key("autoscale"), t.table("autoscale"))
    a.check_keys(("min", "max", "target_queue_depth", "up_delay", "down_delay"))
    lo = a.positive("min", 1, maximum=cap)
    hi = a.positive("max", max(lo, instances), maximum=cap)
    if hi < lo:
        raise ConfigError(p, a.key("max"), f"must be >= min ({lo}), got {hi}")
    if not lo <= instances <= hi:
        raise ConfigError(
            p, t.key("instances"), f"{instances} is outside the autoscale range {lo}..{hi}"
        )
    d = AutoscaleConfig(lo, hi)
    target = float(a.get("target_queue_depth", (int, float), d.target_queue_depth))
    if not 0 < target <= MAX_CREDITS:
        raise ConfigError(
            p, a.key("target_queue_depth"), f"must be in (0, {MAX_CREDITS}], got {target}"
        )
    return AutoscaleConfig(
        lo,
        hi,
        target,
        a.seconds("up_delay", d.up_delay, maximum=3600.0),
        a.seconds("down_delay", d.down_delay, maximum=3600.0),
    )


def resolve(ref: str, *, what: str = "object") -> Any:
    """Import ``module:attr`` (attr may be dotted).

    Raises ValueError naming the reference when the module or attribute is missing.
    """
    mod_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {what} {ref!r}: {exc}") from exc
    return obj


def check_imports(pipeline: PipelineConfig) -> None:
    """Import what the pipeline names and build each stage's entry once, so that a typo
    ends start-up with one line instead of crash-looping instances: every queue's message
    type (a protobuf Message class), every stage's entry (an async function or a class
    built from the stage's ``options``), and whatever an entry class checks in its
    optional ``validate(options)`` hook (the FacTool LM stages check their engine name).

    Raises ConfigError naming the file, the stage or queue, the reference and the cause.
    """
    from google.protobuf.message import Message

    from ._errors import StageError
    from ._stage import StageHandler

    p = pipeline.path
    for q in pipeline.queues.values():
        try:
            typ = resolve(q.type, what="message type")
        except ValueError as exc:
            raise ConfigError(p, f"queues.{q.name}.type", str(exc)) from exc
        if q.prompt is not None:
            try:
                fn = resolve(q.prompt, what="prompt function")
            except ValueError as exc:
                raise ConfigError(p, f"queues.{q.name}.prompt", str(exc)) from exc
            if not callable(fn):
                raise ConfigError(p, f"queues.{q.name}.prompt", f"{q.prompt!r} is not callable")
        if not (isinstance(typ, type) and issubclass(typ, Message)):
            raise ConfigError(
                p, f"queues.{q.name}.type", f"{q.type!r} is not a protobuf Message class"
            )
    for st in pipeline.stages.values():
        key = f"stages.{st.name}.entry"
        try:
            entry = resolve(st.entry, what="stage entry")
        except ValueError as exc:
            raise ConfigError(p, key, str(exc)) from exc
        validate = getattr(entry, "validate", None)
        try:
            if callable(validate) and isinstance(entry, type):
                validate(dict(st.options))
            StageHandler(st.name, entry, dict(st.options), st.stateful)
        except StageError as exc:
            raise ConfigError(p, key, exc.message) from exc
        except (TypeError, ValueError, LookupError) as exc:
            raise ConfigError(
                p, f"stages.{st.name}.options", f"{type(exc).__name__}: {exc}"
            ) from exc
