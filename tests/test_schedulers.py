"""Scheduler policies and their loading through the ``alto.schedulers`` entry points."""

from __future__ import annotations

import importlib.metadata
import math
import random
import subprocess
import sys
import textwrap
import tomllib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alto._errors import AltoError, PluginError, UnknownPluginError
from alto.dataplane._schedulers import (
    ENTRY_POINT_GROUP,
    ConsistentHash,
    Hash,
    LeastOutstanding,
    NoInstanceError,
    PromptAffinity,
    PromptCost,
    PromptSticky,
    RoundRobin,
    Scheduler,
    available_schedulers,
    load_scheduler,
)

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins" / "alto-example-scheduler"


def make(cls: type[Scheduler], ids: range | list[int], **options: Any) -> Scheduler:
    sched = cls(**options)
    for i in ids:
        sched.add_instance(i)
    return sched


def random_keys(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(n)]


def assignment(sched: Scheduler, keys: list[bytes]) -> list[int]:
    loads = dict.fromkeys(sched.instances, 0)
    return [sched.choose(k, loads) for k in keys]


# --- instance bookkeeping, shared by every policy -------------------------------------

ALL = [RoundRobin, LeastOutstanding, Hash, ConsistentHash, PromptSticky, PromptAffinity]


@pytest.mark.parametrize("cls", ALL)
def test_no_instance(cls: type[Scheduler]) -> None:
    sched = cls()
    for key in (None, b"k"):
        with pytest.raises(NoInstanceError, match=r"^no instance available$"):
            sched.choose(key, {})
    sched.add_instance(3)
    sched.remove_instance(3)
    with pytest.raises(NoInstanceError):
        sched.choose(b"k", {})
    assert issubclass(NoInstanceError, AltoError)


@pytest.mark.parametrize("cls", ALL)
def test_instances_sorted_and_checked(cls: type[Scheduler]) -> None:
    sched = make(cls, [5, 1, 3])
    assert sched.instances == (1, 3, 5)
    with pytest.raises(ValueError):
        sched.add_instance(3)
    with pytest.raises(KeyError):
        sched.remove_instance(4)
    sched.remove_instance(3)
    assert sched.instances == (1, 5)
    loads = {1: 0, 5: 0}
    for key in (None, b"a", b"b"):
        assert sched.choose(key, loads) in (1, 5)


@pytest.mark.parametrize("cls", ALL)
def test_single_instance(cls: type[Scheduler]) -> None:
    sched = make(cls, [7])
    for load in (0, 1, 100):
        for key in (None, b"x"):
            assert sched.choose(key, {7: load}) == 7


# --- round-robin and least-outstanding ------------------------------------------------


def test_round_robin_cycles() -> None:
    sched = make(RoundRobin, [2, 0, 1])
    loads = {0: 9, 1: 0, 2: 0}
    assert [sched.choose(b"ignored", loads) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    sched.add_instance(3)
    picks = [sched.choose(None, loads) for _ in range(8)]
    assert Counter(picks) == {0: 2, 1: 2, 2: 2, 3: 2}


def test_least_outstanding_picks_min() -> None:
    sched = make(LeastOutstanding, range(4))
    assert sched.choose(None, {0: 3, 1: 2, 2: 5, 3: 4}) == 1
    assert sched.choose(b"k", {0: 0, 1: 2, 2: 5, 3: 4}) == 0
    assert sched.choose(None, {0: 3, 1: 2, 2: 5, 3: 1}) == 3


def test_least_outstanding_spreads_ties() -> None:
    sched = make(LeastOutstanding, range(4))
    # Static equal loads: ties go round robin, not always to the lowest id.
    assert [sched.choose(None, dict.fromkeys(range(4), 2)) for _ in range(8)] == [
        0, 1, 2, 3, 0, 1, 2, 3,
    ]  # fmt: skip
    # Among the tied minimum only.
    loads = {0: 1, 1: 5, 2: 1, 3: 5}
    assert {sched.choose(None, loads) for _ in range(4)} == {0, 2}


def test_least_outstanding_balances_with_acks() -> None:
    sched = make(LeastOutstanding, range(5))
    loads = dict.fromkeys(range(5), 0)
    rng = random.Random(0)
    picks = Counter[int]()
    for _ in range(1000):
        chosen = sched.choose(None, loads)
        assert loads[chosen] == min(loads.values())
        loads[chosen] += 1
        picks[chosen] += 1
        if rng.random() < 0.5:
            busy = [i for i, load in loads.items() if load]
            loads[rng.choice(busy)] -= 1
    # Acks land anywhere, yet every instance gets its share.
    assert all(150 <= count <= 250 for count in picks.values())


# --- hash -------------------------------------------------------------------------------


def test_hash_spread() -> None:
    sched = make(Hash, range(4))
    counts = Counter(assignment(sched, random_keys(10_000)))
    assert set(counts) == {0, 1, 2, 3}
    for count in counts.values():
        assert 0.85 * 2500 <= count <= 1.15 * 2500


def test_hash_is_stable_and_order_independent() -> None:
    keys = random_keys(200)
    a = make(Hash, [0, 1, 2, 3])
    b = make(Hash, [3, 1, 0, 2])
    assert assignment(a, keys) == assignment(b, keys)
    # Pinned values: CRC-32 is the same in every process and on every machine, unlike
    # Python's salted hash().
    assert [a.choose(k, {}) for k in (b"", b"request-1", b"a")] == [0, 1, 3]


def test_hash_without_key_is_round_robin() -> None:
    sched = make(Hash, range(3))
    assert [sched.choose(None, {}) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


# --- consistent-hash --------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 4, 8])
def test_consistent_hash_adding_moves_about_one_share(n: int) -> None:
    keys = random_keys(10_000, seed=n)
    sched = make(ConsistentHash, range(n))
    before = assignment(sched, keys)
    sched.add_instance(n)
    after = assignment(sched, keys)
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert 0.5 / (n + 1) <= len(moved) / len(keys) <= 1.6 / (n + 1)
    assert {a for _, a in moved} == {n}


@pytest.mark.parametrize("victim", [0, 2, 4])
def test_consistent_hash_removing_moves_only_its_keys(victim: int) -> None:
    keys = random_keys(10_000)
    sched = make(ConsistentHash, range(5))
    before = assignment(sched, keys)
    sched.remove_instance(victim)
    after = assignment(sched, keys)
    for b, a in zip(before, after, strict=True):
        if b == victim:
            assert a != victim
        else:
            assert a == b
    # Putting it back restores the original mapping exactly.
    sched.add_instance(victim)
    assert assignment(sched, keys) == before


def test_consistent_hash_depends_only_on_the_set_of_instances() -> None:
    keys = random_keys(500)
    a = make(ConsistentHash, [0, 1, 2, 3])
    b = make(ConsistentHash, [9, 3, 1, 0, 2])
    b.remove_instance(9)
    assert assignment(a, keys) == assignment(b, keys)


def test_consistent_hash_spread_and_vnodes() -> None:
    counts = Counter(assignment(make(ConsistentHash, range(4)), random_keys(10_000)))
    assert all(1500 <= c <= 3500 for c in counts.values()) and len(counts) == 4
    assert make(ConsistentHash, range(4), vnodes=1).options["vnodes"] == 1
    with pytest.raises(PluginError, match="vnodes"):
        ConsistentHash(vnodes=0)


def test_consistent_hash_without_key_is_least_outstanding() -> None:
    sched = make(ConsistentHash, range(3))
    assert sched.choose(None, {0: 4, 1: 1, 2: 3}) == 1


# --- prompt-sticky ----------------------------------------------------------------------


def bound(loads: dict[int, int], c: float = 1.25) -> int:
    return math.ceil(c * (sum(loads.values()) + 1) / len(loads))


def test_prompt_sticky_follows_the_ring_while_balanced() -> None:
    keys = random_keys(2000)
    ring = make(ConsistentHash, range(4))
    sched = make(PromptSticky, range(4))
    # With equal loads nobody is at the bound: exactly consistent hashing.
    for load in (0, 3):
        loads = dict.fromkeys(range(4), load)
        assert [sched.choose(k, loads) for k in keys] == [ring.choose(k, loads) for k in keys]


def test_prompt_sticky_same_key_sticks() -> None:
    sched = make(PromptSticky, range(4))
    home = sched.choose(b"prompt-A", dict.fromkeys(range(4), 0))
    rng = random.Random(3)
    for _ in range(100):
        # Requests of one prompt come and go over a balanced background load: each one
        # goes to the same instance (prefix-cache hits).
        loads = dict.fromkeys(range(4), rng.randrange(20))
        assert sched.choose(b"prompt-A", loads) == home
        # A second request while the first is in flight too, if still under the bound.
        loads[home] += 1
        if loads[home] + 1 <= bound(loads):
            assert sched.choose(b"prompt-A", loads) == home


def test_prompt_sticky_hot_key_spills_and_returns() -> None:
    sched = make(PromptSticky, range(4))
    loads = dict.fromkeys(range(4), 0)
    home = sched.choose(b"hot", loads)
    picks = []
    for _ in range(100):
        limit = bound(loads)
        i = sched.choose(b"hot", loads)
        assert loads[i] + 1 <= limit
        loads[i] += 1
        picks.append(i)
    # One hot prompt does not overload its home: no three instances may hold 100 frames
    # under the bound (32), so the load spread to all four...
    assert picks[0] == home
    assert set(picks) == set(range(4))
    # ...and it comes home once the home drains.
    loads = {i: (0 if i == home else 10) for i in range(4)}
    assert sched.choose(b"hot", loads) == home


def test_loads_of_removed_instances_are_ignored() -> None:
    # The runtime may still count frames on a draining instance it removed from the policy.
    for cls in ALL:
        sched = make(cls, range(4))
        sched.remove_instance(2)
        loads = {0: 3, 1: 3, 2: 0, 3: 3}
        assert {sched.choose(k, loads) for k in (None, b"p", b"q", b"r")} <= {0, 1, 3}
    sched = make(PromptSticky, range(3))
    home = sched.choose(b"p", dict.fromkeys(range(3), 0))
    # Counting the removed instance's 100 frames would raise the bound to 46 and let the
    # home instance keep the prompt; over the three live instances it is 4.
    loads = {i: (4 if i == home else 2) for i in range(3)} | {99: 100}
    assert sched.choose(b"p", loads) != home


def test_prompt_sticky_without_key_is_least_outstanding() -> None:
    sched = make(PromptSticky, range(3))
    assert sched.choose(None, {0: 4, 1: 1, 2: 3}) == 1


def test_prompt_sticky_options() -> None:
    assert PromptSticky().options == {"vnodes": 100, "load_factor": 1.25}
    assert PromptSticky(load_factor=2).options["load_factor"] == 2
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(PluginError, match="load_factor"):
            PromptSticky(load_factor=bad)
    with pytest.raises(PluginError, match=r"load_factor.*must be float"):
        PromptSticky(load_factor="1.5")


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.sampled_from([1.0, 1.1, 1.25, 2.0]),
    vnodes=st.sampled_from([1, 5, 100]),
    ops=st.lists(
        st.one_of(
            # choose with one of a few prompt keys (key 0 hot: it is most of the draws)
            st.tuples(st.just("choose"), st.sampled_from([0, 0, 0, 0, 1, 2, 3, None])),
            # acknowledge one outstanding frame of the instance at this position
            st.tuples(st.just("ack"), st.integers(0, 5)),
        ),
        max_size=300,
    ),
)
def test_prompt_sticky_never_exceeds_bound(
    n: int, c: float, vnodes: int, ops: list[tuple[str, int | None]]
) -> None:
    sched = make(PromptSticky, range(n), load_factor=c, vnodes=vnodes)
    loads = dict.fromkeys(range(n), 0)
    for op, arg in ops:
        if op == "choose":
            key = None if arg is None else b"prompt-%d" % arg
            limit = bound(loads, c)
            chosen = sched.choose(key, loads)
            assert loads[chosen] + 1 <= limit
            loads[chosen] += 1
        else:
            assert arg is not None
            busy = [i for i in range(n) if loads[i]]
            if busy:
                loads[busy[arg % len(busy)]] -= 1


def test_prompt_affinity_spreads_few_keys_over_instances() -> None:
    # The case consistent hashing leaves to chance: as many templates as instances.
    sched = make(PromptAffinity, range(3))
    loads = dict.fromkeys(range(3), 0)
    homes = [sched.choose(k, loads) for k in (b"qa", b"claims", b"queries")]
    assert sorted(homes) == [0, 1, 2]
    assert [sched.choose(k, loads) for k in (b"qa", b"claims", b"queries")] == homes


def test_prompt_affinity_spills_over_the_bound_and_keeps_its_home() -> None:
    sched = make(PromptAffinity, range(2))
    loads = {0: 0, 1: 0}
    home = sched.choose(b"hot", loads)
    loads[home] = 5  # bound = ceil(1.25 * 6 / 2) = 4
    other = 1 - home
    assert sched.choose(b"hot", loads) == other
    loads[home] = 0
    assert sched.choose(b"hot", loads) == home


def test_prompt_affinity_forgets_keys_of_removed_instances_and_lru() -> None:
    sched = make(PromptAffinity, range(2), max_keys=2)
    loads = {0: 0, 1: 0}
    a = sched.choose(b"a", loads)
    sched.choose(b"b", loads)
    sched.remove_instance(a)
    loads.pop(a)
    assert sched.choose(b"a", loads) == 1 - a
    sched.choose(b"c", loads)  # the table holds 2 keys: "b" is the least recently used
    assert b"b" not in sched._home


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.sampled_from([1.0, 1.25, 2.0]),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("choose"), st.sampled_from([0, 0, 0, 1, 2, None])),
            st.tuples(st.just("ack"), st.integers(0, 5)),
        ),
        max_size=200,
    ),
)
def test_prompt_affinity_never_exceeds_bound(
    n: int, c: float, ops: list[tuple[str, int | None]]
) -> None:
    sched = make(PromptAffinity, range(n), load_factor=c)
    loads = dict.fromkeys(range(n), 0)
    for op, arg in ops:
        if op == "choose":
            key = None if arg is None else b"prompt-%d" % arg
            limit = bound(loads, c)
            chosen = sched.choose(key, loads)
            if key is not None:
                assert loads[chosen] + 1 <= limit
            loads[chosen] += 1
        else:
            assert arg is not None
            busy = [i for i in range(n) if loads[i]]
            if busy:
                loads[busy[arg % len(busy)]] -= 1


# --- options ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL)
def test_unknown_option_names_it_and_the_allowed(cls: type[Scheduler]) -> None:
    with pytest.raises(PluginError) as info:
        cls(bogus=1)
    message = str(info.value)
    assert "'bogus'" in message and cls.name in message
    for allowed in cls.option_defaults:
        assert allowed in message
    if not cls.option_defaults:
        assert "(none)" in message


def test_option_types_are_checked() -> None:
    with pytest.raises(PluginError, match="'vnodes' must be int"):
        ConsistentHash(vnodes=1.5)
    with pytest.raises(PluginError, match="'vnodes' must be int"):
        ConsistentHash(vnodes=True)


def test_repr_names_options_and_instances() -> None:
    assert repr(make(ConsistentHash, [2, 1], vnodes=7)) == (
        "ConsistentHash(vnodes=7, instances=(1, 2))"
    )


# --- loading through entry points (hermetic: the entry points are faked) --------------


class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint: name, value, group and load()."""

    def __init__(self, name: str, target: object, value: str | None = None) -> None:
        self.name = name
        self.value = value or f"fake_module:{name}"
        self.group = ENTRY_POINT_GROUP
        self._target = target

    def load(self) -> object:
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


class Custom(Scheduler):
    name = "custom"
    option_defaults = {"weight": 1.0}  # noqa: RUF012 (a plugin may write it plainly)

    def choose(self, key: bytes | None, loads: Any) -> int:
        return self.instances[-1]


class NeedsArgument(Scheduler):
    name = "needs-argument"

    def __init__(self, required: int, **options: Any) -> None:
        super().__init__(**options)

    def choose(self, key: bytes | None, loads: Any) -> int:
        return self.instances[0]


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    def install(*eps: FakeEntryPoint) -> None:
        def entry_points(**params: Any) -> list[FakeEntryPoint]:
            assert params == {"group": ENTRY_POINT_GROUP}
            return list(eps)

        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)

    return install


def test_load_registered_fake(fake_entry_points: Callable[..., None]) -> None:
    fake_entry_points(FakeEntryPoint("custom", Custom), FakeEntryPoint("hash", Hash))
    assert available_schedulers() == ["custom", "hash"]
    sched = load_scheduler("custom", weight=2)
    assert isinstance(sched, Custom)
    assert sched.options == {"weight": 2}
    sched.add_instance(1)
    sched.add_instance(4)
    assert sched.choose(None, {1: 0, 4: 0}) == 4
    assert isinstance(load_scheduler("hash"), Hash)


def test_unknown_name_lists_available(fake_entry_points: Callable[..., None]) -> None:
    fake_entry_points(FakeEntryPoint("round-robin", RoundRobin), FakeEntryPoint("b", Custom))
    with pytest.raises(UnknownPluginError) as info:
        load_scheduler("nope")
    assert info.value.name == "nope"
    assert info.value.group == ENTRY_POINT_GROUP
    assert info.value.available == ["b", "round-robin"]
    assert "b, round-robin" in str(info.value)


def test_nothing_registered(fake_entry_points: Callable[..., None]) -> None:
    fake_entry_points()
    assert available_schedulers() == []
    with pytest.raises(UnknownPluginError, match=r"\(none\)"):
        load_scheduler("round-robin")


def test_broken_plugin_is_chained(fake_entry_points: Callable[..., None]) -> None:
    cause = ImportError("No module named 'numpyy'")
    fake_entry_points(FakeEntryPoint("broken", cause, value="broken_pkg:Policy"))
    with pytest.raises(PluginError) as info:
        load_scheduler("broken")
    assert not isinstance(info.value, UnknownPluginError)
    assert info.value.__cause__ is cause
    assert info.value.name == "broken"
    assert "broken_pkg:Policy" in str(info.value) and "numpyy" in str(info.value)


@pytest.mark.parametrize("target", [object, RoundRobin(), len, "round-robin", Scheduler])
def test_non_scheduler_is_rejected(fake_entry_points: Callable[..., None], target: object) -> None:
    fake_entry_points(FakeEntryPoint("odd", target))
    with pytest.raises(PluginError, match="odd") as info:
        load_scheduler("odd")
    # The abstract base itself passes the subclass check and fails on creation.
    if target is Scheduler:
        assert isinstance(info.value.__cause__, TypeError)


def test_plugin_constructor_failure_is_chained(fake_entry_points: Callable[..., None]) -> None:
    fake_entry_points(FakeEntryPoint("needs-argument", NeedsArgument))
    with pytest.raises(PluginError, match="needs-argument") as info:
        load_scheduler("needs-argument")
    assert isinstance(info.value.__cause__, TypeError)


def test_unknown_option_through_loader(fake_entry_points: Callable[..., None]) -> None:
    fake_entry_points(FakeEntryPoint("prompt-sticky", PromptSticky))
    with pytest.raises(PluginError) as info:
        load_scheduler("prompt-sticky", load_facter=1.5)
    assert str(info.value) == (
        "alto.schedulers plugin 'prompt-sticky': unknown option 'load_facter'; "
        "allowed: load_factor, vnodes"
    )


def test_same_name_twice(fake_entry_points: Callable[..., None]) -> None:
    # The same target seen twice (one distribution on two paths) is harmless...
    fake_entry_points(
        FakeEntryPoint("rr", RoundRobin, value="a:RoundRobin"),
        FakeEntryPoint("rr", RoundRobin, value="a:RoundRobin"),
    )
    assert isinstance(load_scheduler("rr"), RoundRobin)
    assert available_schedulers() == ["rr"]
    # ...two different ones are ambiguous.
    fake_entry_points(
        FakeEntryPoint("rr", RoundRobin, value="a:RoundRobin"),
        FakeEntryPoint("rr", Hash, value="b:Hash"),
    )
    with pytest.raises(PluginError, match="more than once"):
        load_scheduler("rr")


def test_real_entry_point_objects(fake_entry_points: Callable[..., None]) -> None:
    # importlib's own EntryPoint, pointing at the built-ins: loading resolves the target.
    fake_entry_points(
        importlib.metadata.EntryPoint(
            "least-outstanding", "alto.dataplane._schedulers:LeastOutstanding", ENTRY_POINT_GROUP
        ),
        importlib.metadata.EntryPoint("gone", "alto_no_such_module:X", ENTRY_POINT_GROUP),
    )
    assert isinstance(load_scheduler("least-outstanding"), LeastOutstanding)
    with pytest.raises(PluginError, match="gone") as info:
        load_scheduler("gone")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


# --- a real third-party package, installed with pip -------------------------------------


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
def test_example_plugin_installs_and_loads() -> None:
    # Leaves the environment as it found it: uninstalls only what this test installed.
    was_installed = _installed("alto-example-scheduler")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [
            *pip,
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-e",
            str(PLUGIN_DIR),
        ],
        check=True,
        timeout=120,
    )
    try:
        script = textwrap.dedent(
            """
            from alto.dataplane._schedulers import available_schedulers, load_scheduler
            assert "power-of-two" in available_schedulers(), available_schedulers()
            sched = load_scheduler("power-of-two", seed=7)
            assert type(sched).__module__ == "alto_example_scheduler", type(sched)
            sched.add_instance(1)
            sched.add_instance(2)
            picks = {sched.choose(None, {1: 5, 2: 0}) for _ in range(50)}
            assert picks == {2}, picks
            print("ok")
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "ok"
    finally:
        if not was_installed:
            subprocess.run(
                [*pip, "uninstall", "--quiet", "--yes", "alto-example-scheduler"],
                check=True,
                timeout=120,
            )


# --- prompt-cost ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shared",
    [
        test_no_instance,
        test_instances_sorted_and_checked,
        test_single_instance,
        test_unknown_option_names_it_and_the_allowed,
    ],
)
def test_prompt_cost_keeps_the_shared_bookkeeping(shared: Callable[..., None]) -> None:
    shared(PromptCost)


def test_prompt_cost_is_registered() -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    eps = project["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert eps["prompt-cost"] == "alto.dataplane._schedulers:PromptCost"


def test_prompt_cost_new_key_goes_to_the_least_loaded_and_sticks() -> None:
    sched = make(PromptCost, range(3), miss_cost=2.0)
    loads = {0: 3, 1: 1, 2: 2}
    assert sched.choose(b"t", loads) == 1
    assert sched.cached_keys(1) == (b"t",)
    # Cached on 1: it keeps the key while within miss_cost of the least loaded.
    loads = {0: 0, 1: 2, 2: 1}
    assert [sched.choose(b"t", loads) for _ in range(5)] == [1] * 5
    assert sched.cached_keys(0) == sched.cached_keys(2) == ()


def test_prompt_cost_hot_key_spreads_by_load() -> None:
    sched = make(PromptCost, range(3), miss_cost=2.0)
    loads = dict.fromkeys(range(3), 0)
    home = sched.choose(b"hot", loads)
    loads[home] += 1
    placed = [home]
    for _ in range(30):  # nothing finishes: the hot key's load must spread
        i = sched.choose(b"hot", loads)
        # A miss costs 2 * (load + 1): the home takes frames until it carries 3 * (the
        # least load + 1) - 1, never more.
        assert loads[i] <= 3 * (min(loads.values()) + 1) - 1
        loads[i] += 1
        placed.append(i)
    assert set(placed) == {0, 1, 2}
    # Once every instance has the key, the frames go to the least loaded.
    assert max(loads.values()) - min(loads.values()) <= 1
    # Each instance paid the miss once: after that the key is cached everywhere.
    assert all(sched.cached_keys(i) == (b"hot",) for i in range(3))
    # The copies are used in turn: equal loads and equal hits rotate.
    loads = dict.fromkeys(range(3), 4)
    assert sorted(sched.choose(b"hot", loads) for _ in range(3)) == [0, 1, 2]


def test_prompt_cost_cold_key_keeps_its_home_while_a_hot_one_spreads() -> None:
    sched = make(PromptCost, range(2), miss_cost=3.0)
    loads = {0: 0, 1: 0}
    cold_home = sched.choose(b"cold", loads)
    hot_home = sched.choose(b"hot", loads)
    assert cold_home != hot_home  # the second new key goes to the other idle instance
    loads = {cold_home: 2, hot_home: 0}
    # "cold" stays home (2 < 0 + 3 * 1): a miss would cost more than the queue.
    assert sched.choose(b"cold", loads) == cold_home
    loads = {cold_home: 4, hot_home: 0}
    assert sched.choose(b"cold", loads) == hot_home  # 4 > 0 + 3 * 1: worth a miss
    # The price of a miss grows with the load it lands on: a miss at 10 frames costs
    # 10 + 3 * 11 = 43, so a key cached only on an instance at 40 stays there.
    assert sched.choose(b"warm", {cold_home: 0, hot_home: 1}) == cold_home
    assert sched.choose(b"warm", {cold_home: 40, hot_home: 10}) == cold_home
    assert sched.choose(b"warm", {cold_home: 44, hot_home: 10}) == hot_home


def test_prompt_cost_prefers_a_cached_instance_on_equal_cost() -> None:
    sched = make(PromptCost, range(2), miss_cost=1.0)
    assert sched.choose(b"k", {0: 0, 1: 0}) == 0
    # Cost 1 on both: 0 has the key (1 + 0), 1 does not (0 + 1). The cursor points at 1.
    assert sched.choose(b"k", {0: 1, 1: 0}) == 0


def test_prompt_cost_models_an_lru_of_keys_per_instance() -> None:
    sched = make(PromptCost, [5], cache_keys=2)
    loads = {5: 0}
    for key in (b"a", b"b", b"a", b"c"):
        sched.choose(key, loads)
    assert sched.cached_keys(5) == (b"a", b"c")  # "b" was the least recently sent


def test_prompt_cost_forgets_removed_instances_and_feeds_new_ones() -> None:
    sched = make(PromptCost, range(2), miss_cost=2.0)
    loads = {0: 0, 1: 0}
    home = sched.choose(b"k", loads)
    sched.remove_instance(home)
    other = 1 - home
    loads = {other: 5}
    assert sched.choose(b"k", loads) == other
    with pytest.raises(KeyError):
        sched.cached_keys(home)
    sched.add_instance(7)
    loads = {other: 5, 7: 0}
    assert sched.choose(b"new", loads) == 7  # a new key: the idle newcomer
    assert sched.choose(b"k", loads) == 7  # 5 > 0 + 2: the newcomer takes overflow
    assert sched.cached_keys(other) == (b"k",)


def test_prompt_cost_without_key_is_least_outstanding() -> None:
    sched = make(PromptCost, range(3))
    assert sched.choose(None, {0: 4, 1: 2, 2: 3}) == 1
    assert all(sched.cached_keys(i) == () for i in range(3))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"miss_cost": -1}, "'miss_cost' must be a number in 0..10000"),
        ({"miss_cost": float("nan")}, "'miss_cost' must be a number in 0..10000"),
        ({"miss_cost": 1e9}, "'miss_cost' must be a number in 0..10000"),
        ({"miss_cost": "high"}, "'miss_cost' must be float"),
        ({"cache_keys": 0}, "'cache_keys' must be in 1..65536"),
        ({"cache_keys": 1 << 20}, "'cache_keys' must be in 1..65536"),
        ({"cache_keys": 2.5}, "'cache_keys' must be int"),
    ],
)
def test_prompt_cost_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(PluginError, match=message) as info:
        PromptCost(**options)
    assert "prompt-cost" in str(info.value)
    assert PromptCost(miss_cost=0, cache_keys=1).options["miss_cost"] == 0


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 6),
    miss=st.sampled_from([0.0, 1.0, 2.5, 4.0]),
    keys=st.integers(1, 4),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("choose"), st.sampled_from([0, 0, 0, 1, 2, 3, None])),
            st.tuples(st.just("ack"), st.integers(0, 5)),
        ),
        max_size=200,
    ),
)
def test_prompt_cost_bounds_the_load_by_the_least_loaded(
    n: int, miss: float, keys: int, ops: list[tuple[str, int | None]]
) -> None:
    sched = make(PromptCost, range(n), miss_cost=miss, cache_keys=keys)
    loads = dict.fromkeys(range(n), 0)
    for op, arg in ops:
        if op == "choose":
            key = None if arg is None else b"prompt-%d" % arg
            chosen = sched.choose(key, loads)
            assert loads[chosen] <= (1 + miss) * (min(loads.values()) + 1) - 1
            if key is not None:
                assert sched.cached_keys(chosen)[-1] == key
            assert all(len(sched.cached_keys(i)) <= keys for i in range(n))
            loads[chosen] += 1
        else:
            assert arg is not None
            busy = [i for i in range(n) if loads[i]]
            if busy:
                loads[busy[arg % len(busy)]] -= 1
