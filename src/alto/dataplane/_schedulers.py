"""Scheduler policies: which instance of a stage gets the next frame.

The runtime keeps one :class:`Scheduler` per stage (for the edge or edges into it) and
calls :meth:`Scheduler.choose` once per frame in the relay hot path, so a policy must
decide in a handful of operations: everything that depends only on the set of instances
(sorted id lists, hash rings) is computed in :meth:`~Scheduler.add_instance` and
:meth:`~Scheduler.remove_instance`, never per frame. Instances are the runtime's integer
instance ids; ``loads`` is the runtime's count of outstanding frames per instance
(dispatched minus acknowledged, the queue depth of design invariant 5).

What ``key`` means depends on the edge, and the pipeline config picks the policy to match:

``round-robin``
    The paper's policy for stateless stages: any instance may take any frame, so cycle.
    The key is ignored.
``least-outstanding``
    Also for stateless stages, and better than round robin when frames differ in cost
    (one slow LM call should not queue work behind it): the instance with the fewest
    outstanding frames, ties broken round robin so that equal loads spread instead of
    piling onto the lowest id.
``hash``
    The paper's aggregation-aware routing for stateful stages (section 3.1):
    ``hash(key) mod n`` where the key is the bytes of the key-path prefix at the stage's
    aggregation level, so every partial output of one group meets at one instance. The
    hash is CRC-32, never Python's ``hash()``: that is salted per process
    (PYTHONHASHSEED), and the mapping must not depend on which process computes it.
    Changing ``n`` remaps nearly every key; the runtime pins open groups (invariant 1),
    so only new groups follow the new mapping.
``consistent-hash``
    The same guarantee with less churn on scaling (Karger et al., STOC 1997): each
    instance owns ``vnodes`` points on a ring and a key goes to the owner of the first
    point at or after the key's hash. Adding an instance to ``n`` moves only the keys
    that now land on its points, about ``1/(n+1)`` of them; removing one moves only its
    own keys. Keys without a key path fall back to least-outstanding.
``prompt-sticky``
    For LM stages: frames whose prompt key (the hash of a shared prompt prefix) is equal
    go to the same engine so that its prefix cache is reused, but a hot prompt must not
    overload one instance. This is consistent hashing with bounded loads (Mirrokni,
    Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads", SODA 2018): no
    instance may carry more than ``ceil(c * (total_load + 1) / n)`` frames, where
    ``total_load + 1`` counts the frame being placed and ``c`` is the ``load_factor``
    option; a key whose instance is at the bound walks the ring to the next instance
    under it. Because some instance always carries at most the mean load and the bound
    is above the mean for ``c >= 1``, the walk always ends. Frames without a prompt key
    fall back to least-outstanding.
``prompt-affinity``
    The same bound, but the key's home comes from a remembered table instead of a hash:
    a new key goes to the instance with the fewest keys. With a handful of prompt
    templates, hashing often homes two on one instance and none on another (see
    :class:`PromptAffinity` and ``benchmarks/prompt_sticky.py``).
``prompt-cost``
    Prompt-aware routing that trades cache hits against queueing per frame, as the
    paper's section 6.2 proposes: the frame goes to the instance with the least
    expected cost, its outstanding frames plus, where the key is not cached there,
    ``miss_cost * (outstanding + 1)`` (a miss's prefill delays every sequence batched on
    that instance). "Cached" comes from a model of each instance's prefix cache that the
    policy keeps from its own past decisions (an LRU of the last ``cache_keys`` keys it
    sent there), since it cannot see the engines; SGLang's cache-aware router models its
    workers' radix trees the same way. A cold template stays on the instance that has it;
    a hot one is copied to another instance once its home's queue costs more than a miss
    elsewhere, so it spreads over as many instances as its load needs (see
    :class:`PromptCost` and ``benchmarks/prompt_routing.py``).

Third-party policies subclass :class:`Scheduler` and register in the entry point group
``alto.schedulers`` (see ``plugins/alto-example-scheduler``); the built-ins above register
through the same group, so :func:`load_scheduler` treats them alike.

Errors::

    AltoError
    +-- PluginError            unknown option, or a plugin failed to import or is no Scheduler
    |   +-- UnknownPluginError no policy of that name is registered (lists the available)
    +-- NoInstanceError        choose() on a stage that has no instance right now
"""

from __future__ import annotations

import abc
import hashlib
import math
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from importlib import metadata
from types import MappingProxyType
from typing import Any, ClassVar
from zlib import crc32

from alto._errors import AltoError, PluginError, UnknownPluginError

_DERIVED = b"\x00"  # the first byte of a key derived from a prompt (alto._stage.DERIVED)

__all__ = [
    "ENTRY_POINT_GROUP",
    "ConsistentHash",
    "Hash",
    "LeastOutstanding",
    "NoInstanceError",
    "PromptAffinity",
    "PromptCost",
    "PromptSticky",
    "RoundRobin",
    "Scheduler",
    "available_schedulers",
    "load_scheduler",
]

ENTRY_POINT_GROUP = "alto.schedulers"


class NoInstanceError(AltoError):
    """The stage has no instance to choose from (none started yet, or all removed).

    The runtime holds the frame until an instance registers, or fails the request if the
    stage cannot get one; it is not a bug in the policy.
    """

    def __init__(self) -> None:
        super().__init__("no instance available")


class Scheduler(abc.ABC):
    """The routing policy of one stage: picks an instance id for each frame.

    One object serves one stage (the edge or edges into it); instances are the runtime's
    integer ids. Subclasses set :attr:`name` (the entry point name), may declare
    :attr:`option_defaults`, and implement :meth:`choose`. To keep :meth:`choose` cheap,
    precompute in :meth:`_instances_changed`, which runs after every add and remove.

    Raises (from ``__init__``):
        PluginError: an option is not in :attr:`option_defaults` (the message names it
            and the allowed ones), or has the wrong type or value.
    """

    name: ClassVar[str]
    #: The options this policy accepts, with their defaults; any other is rejected. The
    #: type of the default is the type required (an int is accepted for a float option).
    option_defaults: ClassVar[Mapping[str, object]] = MappingProxyType({})

    def __init__(self, **options: Any) -> None:
        for key, value in options.items():
            self._check_option(key, value)
        merged = {**self.option_defaults, **options}
        #: The options in effect: the defaults updated with those given.
        self.options: Mapping[str, Any] = MappingProxyType(merged)
        self._instances: tuple[int, ...] = ()
        # The sorted ids twice over, so that any rotation is one slice (least-outstanding
        # scans from the round-robin cursor without wrap-around arithmetic).
        self._doubled: tuple[int, ...] = ()
        self._index: dict[int, int] = {}
        self._cursor = 0

    @classmethod
    def _policy_name(cls) -> str:
        return getattr(cls, "name", cls.__qualname__)

    def _check_option(self, key: str, value: object) -> None:
        if key not in self.option_defaults:
            allowed = ", ".join(sorted(self.option_defaults)) or "(none)"
            raise PluginError(
                ENTRY_POINT_GROUP,
                self._policy_name(),
                f"unknown option {key!r}; allowed: {allowed}",
            )
        default = self.option_defaults[key]
        if default is None:
            return
        expected: tuple[type, ...] = (type(default),)
        if isinstance(default, float):
            expected = (int, float)
        # bool is an int subclass; `vnodes = true` in a config is a mistake, not 1.
        wrong_bool = isinstance(value, bool) and not isinstance(default, bool)
        if wrong_bool or not isinstance(value, expected):
            raise PluginError(
                ENTRY_POINT_GROUP,
                self._policy_name(),
                f"option {key!r} must be {type(default).__name__}, got {value!r}",
            )

    def _option_error(self, message: str) -> PluginError:
        return PluginError(ENTRY_POINT_GROUP, self._policy_name(), message)

    def __repr__(self) -> str:
        options = "".join(f"{k}={v!r}, " for k, v in self.options.items())
        return f"{type(self).__name__}({options}instances={self._instances!r})"

    @property
    def instances(self) -> tuple[int, ...]:
        """The instance ids, sorted ascending."""
        return self._instances

    def add_instance(self, instance_id: int) -> None:
        """Make ``instance_id`` eligible for new frames.

        Raises:
            ValueError: the instance is already present.
        """
        if instance_id in self._index:
            raise ValueError(f"instance {instance_id} already added")
        self._set_instances((*self._instances, instance_id))

    def remove_instance(self, instance_id: int) -> None:
        """Stop choosing ``instance_id`` (it drains, crashed or was scaled away).

        Frames already routed to it are the runtime's business (groups stay pinned).

        Raises:
            KeyError: the instance is not present.
        """
        if instance_id not in self._index:
            raise KeyError(instance_id)
        self._set_instances(i for i in self._instances if i != instance_id)

    def _set_instances(self, ids: Iterable[int]) -> None:
        # Sorted, so that every policy is a function of the set of ids and not of the order
        # in which instances happened to register.
        self._instances = tuple(sorted(ids))
        self._doubled = self._instances * 2
        self._index = {instance: i for i, instance in enumerate(self._instances)}
        self._instances_changed()

    def _instances_changed(self) -> None:  # noqa: B027 (optional hook, empty by default)
        """Hook: rebuild whatever :meth:`choose` precomputes from :attr:`instances`."""

    @abc.abstractmethod
    def choose(self, key: bytes | None, loads: Mapping[int, int]) -> int:
        """Pick the instance for one frame.

        ``key`` is the aggregation key (bytes of the key-path prefix) for hash policies,
        the prompt key for prompt-sticky, or ``None`` when the frame has none. ``loads``
        maps every id in :attr:`instances` to its outstanding frames.

        Raises:
            NoInstanceError: there is no instance to choose.
        """

    # Shared building blocks, for the built-ins' fallbacks and for plugins.

    def _round_robin(self) -> int:
        """The next instance in id order, cycling."""
        ids = self._instances
        if not ids:
            raise NoInstanceError()
        i = self._cursor
        if i >= len(ids):
            i = 0
        self._cursor = i + 1
        return ids[i]

    def _least_outstanding(self, loads: Mapping[int, int]) -> int:
        """The least loaded instance; among equals, the first from the round-robin cursor."""
        n = len(self._instances)
        if not n:
            raise NoInstanceError()
        start = self._cursor
        if start >= n:
            start = 0
        # Scan from the cursor and keep the first of equal loads: ties go round robin. A
        # plain loop: min(..., key=loads.__getitem__) measured 2.5x slower at n = 4.
        doubled = self._doubled
        best = doubled[start]
        best_load = loads[best]
        if best_load:
            for instance in doubled[start + 1 : start + n]:
                load = loads[instance]
                if load < best_load:
                    best = instance
                    best_load = load
                    if not load:
                        break  # nothing beats an idle instance
        self._cursor = self._index[best] + 1
        return best


class RoundRobin(Scheduler):
    """Cycle over the instances in id order; the key is ignored (the paper's default)."""

    name = "round-robin"

    def choose(self, key: bytes | None, loads: Mapping[int, int]) -> int:
        return self._round_robin()


class LeastOutstanding(Scheduler):
    """The instance with the fewest outstanding frames; ties broken round robin."""

    name = "least-outstanding"

    def choose(self, key: bytes | None, loads: Mapping[int, int]) -> int:
        return self._least_outstanding(loads)


class Hash(Scheduler):
    """``crc32(key) mod n`` over the sorted instances; frames without a key go round robin."""

    name = "hash"

    def choose(self, key: bytes | None, loads: Mapping[int, int]) -> int:
        if key is None:
            return self._round_robin()
        ids = self._instances
        if not ids:
            raise NoInstanceError()
        return ids[crc32(key) % len(ids)]


def _ring_point(instance_id: int, vnode: int) -> int:
    # A vnode's place on the 32-bit ring. blake2b rather than CRC-32 here: CRC is linear,
    # so the near-identical strings "3:17", "3:18" would land in structured clusters; this
    # runs only when instances change, so its cost does not matter. Keys are hashed with
    # CRC-32 (per frame, about 0.1 µs against 0.7 µs for blake2b); they need only spread.
    digest = hashlib.blake2b(f"{instance_id}:{vnode}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


class ConsistentHash(Scheduler):
    """A hash ring with ``vnodes`` virtual nodes per instance.

    Options:
        vnodes: points per instance. The share of keys an instance owns deviates from
            ``1/n`` by about ``1/sqrt(vnodes)`` (10% at the default 100; libketama uses 160).
    """

    name = "consistent-hash"
    option_defaults: ClassVar[Mapping[str, object]] = MappingProxyType({"vnodes": 100})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._vnodes: int = self.options["vnodes"]
        if self._vnodes < 1:
            raise self._option_error(f"option 'vnodes' must be at least 1, got {self._vnodes}")
        self._points_of: dict[int, list[int]] = {}
        self._points: list[int] = []
        self._owners: tuple[int, ...] = ()

    def _instances_changed(self) -> None:
        points_of = {
            i: self._points_of.get(i) or [_ring_point(i, v) for v in range(self._vnodes)]
            for i in self._instances
        }
        self._points_of = points_of
        # Sorting (point, id) pairs breaks the rare exact collision by id, so the ring
        # still depends only on the set of instances.
        ring = sorted((p, i) for i, ps in points_of.items() for p in ps)
        self._points = [p for p, _ in ring]
        self._owners = tuple(i for _, i in ring)

    def _position(self, key: bytes) -> int:
        """Index into the ring of the first point at or after the key's hash."""
        i = bisect_left(self._points, crc32(key))
        return 0 if i == len(self._points) else i

    def choose(self, key: bytes | None, loads: Mapping[int, int]) -> int:
        if key is None or not self._owners:
            return self._least_outstanding(loads)
        return self._owners[self._position(key)]


def _load_factor(sched: Scheduler) -> float:
    """The bounded-load factor ``c`` of a policy's options, checked."""
    c = float(sched.options["load_factor"])
    # c < 1 could put the bound below the mean load, where no instance may qualify.
    if not c >= 1.0 or math.isinf(c):
        raise sched._option_error(f"option 'load_factor' must be a finite number >= 1, got {c}")
    return c


class PromptSticky(ConsistentHash):
    """Consistent hashing with bounded loads (Mirrokni et al., SODA 2018) on prompt keys.

    Options:
        vnodes: as for consistent-hash.
        load_factor: ``c``, at least 1. No instance is given a frame that would take it
            past ``ceil(c * (total_load + 1) / n)``. Smaller keeps loads flatter and
            moves hot prompts sooner (fewer prefix-cache hits); the paper bounds the
            expected keys moved per change by ``O(1/(c-1)**2)`` for ``c > 1``, so values
            near 1 churn. HAProxy exposes the same knob as ``hash-balance-factor``.
    """

    name = "prompt-sticky"
    option_defaults: ClassVar[Mapping[str, object]] = MappingProxyType(
        {"vnodes": 100, "load_factor": 1.25}
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._load_factor = _load_factor(self)

    def choose(self, key: bytes | None, loads: Mapping[int, int]) -> int:
        if key is None or not self._owners:
            return self._least_outstanding(loads)
        owners = self._owners
        i = self._position(key)
        owner = owners[i]
        load = loads[owner]
        if not load:
            # The bound is at least 1, so an idle home instance always qualifies: the
            # common case costs no sum over the loads.
            return owner
        n = len(self._instances)
        # loads holds every instance; if it holds nothing else, summing its values is the
        # same total at half the cost of looking each instance up.
        if len(loads) == n:
            total = sum(loads.values())
        else:
            total = sum(map(loads.__getitem__, self._instances))
        bound = math.ceil(self._load_factor * (total + 1) / n)
        if load < bound:
            return owner
        # Walk clockwise to the next point whose owner is under the bound. Owners repeat
        # along the ring; re-checking one is a dict lookup, cheaper than tracking a set.
        m = len(owners)
        for j in range(i + 1, i + m):
            owner = owners[j % m]
            if loads[owner] < bound:
                return owner
        # Unreachable for c >= 1 (the least loaded instance is under the bound); kept so
        # that a runtime passing inconsistent loads still gets an answer.
        return self._least_outstanding(loads)


class PromptAffinity(Scheduler):
    """A sticky table with bounded loads: prompt-sticky without the hash's coin flips.

    With few distinct prompt keys (a pipeline has a handful of templates), consistent
    hashing often homes two templates on one instance and none on another: with 2 keys and
    2 instances, half the time. This policy remembers an assignment instead: a key seen for
    the first time goes to the instance with the fewest keys assigned (ties: the least
    loaded), and stays there while that instance is under the same bound as prompt-sticky,
    ``ceil(c * (total_load + 1) / n)``; over the bound the least loaded instance takes the
    frame and the key keeps its home. Keys of a removed instance are forgotten and placed
    again when next seen; new instances receive new keys first. Not consistent across
    runtimes (the table lives in this runtime), which a single central runtime does not need.

    Keys derived from the prompt itself (a queue's ``prompt`` function in the pipeline file;
    ``alto._stage.prefix_key``: chains of block hashes) are matched by prefix: a prompt
    never seen goes home with the longest prefix it shares with one that was, as SGLang's
    cache-aware router and llm-d's prefix scorer match prompts, so requests of one
    template stay together however their tails differ. Cost: at most 8 dict lookups for a
    new key.

    Options:
        load_factor: ``c``, at least 1 (as for prompt-sticky).
        max_keys: the table's size; the least recently used key is forgotten past it.
    """

    name = "prompt-affinity"
    option_defaults: ClassVar[Mapping[str, object]] = MappingProxyType(
        {"load_factor": 1.25, "max_keys": 4096}
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._load_factor = _load_factor(self)
        self._max_keys = int(self.options["max_keys"])
        if self._max_keys < 1:
            raise self._option_error(f"option 'max_keys' must be >= 1, got {self._max_keys}")
        self._home: OrderedDict[bytes, int] = OrderedDict()
        self._keys_of: dict[int, int] = {}

    def _longest_prefix_home(self, key: bytes) -> int | None:
        for end in range(len(key) - 8, 8, -8):
            home = self._home.get(key[:end])
            if home is not None:
                return home
        return None

    def _remember(self, key: bytes, home: int) -> None:
        old = self._home.get(key)
        if old is not None:
            self._keys_of[old] -= 1
        self._home[key] = home
        self._home.move_to_end(key)
        self._keys_of[home] += 1
        if len(self._home) > self._max_keys:
            _, evicted = self._home.popitem(last=False)
            self._keys_of[evicted] -= 1

    def _instances_changed(self) -> None:
        live = set(self._instances)
        for key in [k for k, i in self._home.items() if i not in live]:
            del self._home[key]
        self._keys_of = {i: 0 for i in self._instances}
        for i in self._home.values():
            self._keys_of[i] += 1

    def choose(self, key: bytes | None, loads: Mapping[int, int]) -> int:
        if key is None or not self._instances:
            return self._least_outstanding(loads)
        home = self._home.get(key)
        if home is not None:
            self._home.move_to_end(key)
        else:
            derived = key[:1] == _DERIVED
            # A key derived from the prompt (alto._stage.prefix_key) is a chain of 8-byte
            # block hashes: a new prompt goes where the longest prefix it shares with an
            # earlier one went, since that engine's cache holds those blocks.
            home = self._longest_prefix_home(key) if derived else None
            if home is None:
                home = min(self._instances, key=lambda i: (self._keys_of[i], loads[i]))
            if derived:
                for end in range(9, len(key) + 1, 8):
                    self._remember(key[:end], home)
            else:
                self._remember(key, home)
        load = loads[home]
        if not load:
            return home
        total = sum(map(loads.__getitem__, self._instances))
        bound = math.ceil(self._load_factor * (total + 1) / len(self._instances))
        if load < bound:
            return home
        return self._least_outstanding(loads)


class PromptCost(Scheduler):
    """Least expected cost: queue depth plus a modelled prefix-cache miss.

    The paper's section 6.2 asks for routing that keeps requests of one prompt on the
    instance that has its prefix cached *and* moves load between prompts as their demand
    shifts. This policy prices both in one unit, outstanding frames: a frame with prompt
    key ``k`` goes to the instance ``i`` minimising::

        loads[i]                                   if k is modelled as cached on i
        loads[i] + miss_cost * (loads[i] + 1)      otherwise

    ties going to an instance that has the key, then round robin. A miss prefills the
    shared prefix on ``i``, and a prefill step delays every sequence batched there (the
    ``loads[i]`` already there and the new one), so its cost grows with that instance's
    load; ``miss_cost`` is the prefill of the shared prefix in units of the delay one
    more queued frame causes. The runtime calls the policy as each frame is routed, so it
    binds on the live queue depths of that moment.

    The cache model. A scheduler cannot see the engines (the runtime never imports one),
    so it models each instance's prefix cache from its own decisions, as SGLang's
    cache-aware router keeps an approximate radix tree per worker: an LRU of the last
    ``cache_keys`` distinct keys it sent to that instance. The model is only a guess
    (an engine may evict sooner under memory pressure, or hold more); a wrong guess costs
    a miss or a detour, never correctness. Keys are compared whole: a key derived from the
    prompt (``alto._stage.prefix_key``, the hashes of its first 512 bytes) is the same for
    every request of a template whose shared part is at least that long, but differs per
    request for a shorter template, which this policy then treats as a new prompt each
    time (the least loaded instance wins); ``prompt-affinity`` matches such keys by prefix.

    Consequences: a key seen for the first time goes to the least loaded instance and
    stays there while the cost of a miss elsewhere is higher; past that the frame goes
    elsewhere and the key is then cached on two instances, whose loads it shares; so a hot
    prompt spreads over as many instances as its load needs and a rare one keeps its
    single home. The chosen instance never carries more than
    ``(1 + miss_cost) * (least load + 1) - 1`` frames: additive slack at low load and a
    factor of the least load at high load, as prompt-sticky's bound is a factor of the
    mean. Instances added receive new keys and overflow first; the model of a removed
    instance is dropped.

    Cost per frame: one load lookup and one membership test per instance, and an O(1) LRU
    update: 0.95 µs per call at four instances on this machine (least-outstanding 0.46 µs,
    prompt-affinity 0.79 µs; a ``timeit`` of ``choose`` with equal loads).

    Options:
        miss_cost: the prefill delay of a miss, in queued frames, 0..10000 (0 is
            least-outstanding that prefers a cached instance on ties).
            ``benchmarks/prompt_routing.py`` (1-4k-token prefixes at 10k tokens/s, Table
            1's QA decoding, batch 32) found 3 best among 0.25 to 4: at 2 and below it
            copies templates too eagerly and loses hits at moderate load, at 4 it balances
            less. The default is 3.
        cache_keys: how many prompt keys one instance's prefix cache is assumed to hold,
            1..65536: about its free KV capacity divided by a template's prefix length.
    """

    name = "prompt-cost"
    option_defaults: ClassVar[Mapping[str, object]] = MappingProxyType(
        {"miss_cost": 3.0, "cache_keys": 8}
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        miss = float(self.options["miss_cost"])
        if not 0.0 <= miss <= 10_000.0:  # also rejects NaN
            raise self._option_error(
                f"option 'miss_cost' must be a number in 0..10000 (frames), got {miss}"
            )
        keys = int(self.options["cache_keys"])
        if not 1 <= keys <= 65_536:
            raise self._option_error(f"option 'cache_keys' must be in 1..65536, got {keys}")
        self._miss_cost = miss
        self._cache_keys = keys
        # Per instance: the keys modelled as in its prefix cache, least recently sent first.
        self._cached: dict[int, OrderedDict[bytes, None]] = {}

    def _instances_changed(self) -> None:
        self._cached = {i: self._cached.get(i) or OrderedDict() for i in self._instances}

    def cached_keys(self, instance_id: int) -> tuple[bytes, ...]:
        """The keys modelled as cached on ``instance_id``, least recently sent first.

        Raises:
            KeyError: the instance is not present.
        """
        return tuple(self._cached[instance_id])

    def choose(self, key: bytes | None, loads: Mapping[int, int]) -> int:
        if key is None or not self._instances:
            return self._least_outstanding(loads)
        n = len(self._instances)
        start = self._cursor
        if start >= n:
            start = 0
        cached = self._cached
        miss = self._miss_cost
        best = -1
        best_cost = math.inf
        best_hit = False
        # Scan from the round-robin cursor, as least-outstanding does, so that equal costs
        # rotate; among equal costs an instance holding the key wins.
        for instance in self._doubled[start : start + n]:
            hit = key in cached[instance]
            load = loads[instance]
            cost = load if hit else load + miss * (load + 1)
            if cost < best_cost or (cost == best_cost and hit and not best_hit):
                best, best_cost, best_hit = instance, cost, hit
        lru = cached[best]
        if best_hit:
            lru.move_to_end(key)
        else:
            lru[key] = None
            if len(lru) > self._cache_keys:
                lru.popitem(last=False)
        self._cursor = self._index[best] + 1
        return best


def _entry_points() -> list[metadata.EntryPoint]:
    # Looked up through the module attribute on every call, so that tests can monkeypatch
    # importlib.metadata.entry_points with fakes.
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def available_schedulers() -> list[str]:
    """The names registered in the ``alto.schedulers`` entry point group, sorted."""
    return sorted({ep.name for ep in _entry_points()})


def load_scheduler(name: str, **options: Any) -> Scheduler:
    """Load the policy registered as ``name`` and create it with ``options``.

    Raises:
        UnknownPluginError: no policy of that name is registered; lists the available ones.
        PluginError: the plugin failed to import, is not a :class:`Scheduler` subclass,
            is registered twice with different targets, or rejected the options (unknown
            option, wrong type or value). Foreign exceptions are chained.
    """
    eps = _entry_points()
    matches = [ep for ep in eps if ep.name == name]
    if not matches:
        raise UnknownPluginError(ENTRY_POINT_GROUP, name, sorted({ep.name for ep in eps}))
    targets = sorted({ep.value for ep in matches})
    if len(targets) > 1:
        raise PluginError(
            ENTRY_POINT_GROUP, name, f"registered more than once: {', '.join(targets)}"
        )
    try:
        cls = matches[0].load()
    except Exception as exc:
        raise PluginError(
            ENTRY_POINT_GROUP, name, f"failed to load {targets[0]!r}: {exc!r}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, Scheduler)):
        raise PluginError(
            ENTRY_POINT_GROUP, name, f"{targets[0]!r} is not a subclass of alto Scheduler"
        )
    try:
        return cls(**options)
    except AltoError:
        raise
    except Exception as exc:
        raise PluginError(
            ENTRY_POINT_GROUP, name, f"could not be created with {options!r}: {exc!r}"
        ) from exc
