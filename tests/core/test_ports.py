"""Every implementation has every member of the contract it implements, with the same parameters
(the behaviour behind them is checked by tests/cluster/test_conformance.py on every backend)."""

from __future__ import annotations

import inspect

import pytest

from server.cluster.redis_engine import RedisEngine
from server.cluster.redis_worker import RedisWorker
from server.core.engine import JobEngine
from server.core.ports import Engine, JobHost


def members(protocol) -> dict[str, object]:
    return {name: value for name, value in vars(protocol).items()
            if not name.startswith("_") and (callable(value) or isinstance(value, property))}


def parameters(fn) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("protocol, implementation", [
    (Engine, JobEngine), (Engine, RedisEngine), (JobHost, JobEngine), (JobHost, RedisWorker)])
def test_implementation_has_the_contracts_members(protocol, implementation):
    wanted = members(protocol)
    assert wanted, "the protocol declares members"
    for name, declared in wanted.items():
        actual = inspect.getattr_static(implementation, name, None)
        assert actual is not None, f"{implementation.__name__} lacks {protocol.__name__}.{name}"
        if isinstance(declared, property):
            assert isinstance(actual, property), f"{implementation.__name__}.{name} is not a property"
            continue
        assert inspect.iscoroutinefunction(actual) == inspect.iscoroutinefunction(declared), name
        assert parameters(actual) == parameters(declared), f"{implementation.__name__}.{name} parameters differ"

