"""The job state module: the transition table, the sets derived from it, RANK, the restart rule,
and the Lua predicates generated from it (issue 12)."""

from __future__ import annotations

import re
import time

import pytest

from server.cluster import scripts
from server.core.errors import IllegalTransition
from server.core.jobs import JobRecord
from server.core.states import (ACTIVE, CANCELLABLE, FAILURE_MESSAGES, RANK, RECOVERY, RECOVERY_EXHAUSTED,
                                RESTART_REASON, STOPPABLE, TERMINAL, TRANSITIONS, FailureCode, JobStatus,
                                check_transition, exhausted_reason, lua_set)
from tests.engine_helpers import spec

S = JobStatus
LEGAL = sorted((a, b) for a, targets in TRANSITIONS.items() for b in targets)
ILLEGAL = sorted((a, b) for a in S for b in S if b not in TRANSITIONS[a])


def record(status: JobStatus) -> JobRecord:
    now = time.time()
    return JobRecord(job_id="ab" * 32, spec=spec(), status=status, created_at=now, updated_at=now)


def test_the_table_is_exactly_this():
    assert TRANSITIONS == {
        S.PENDING: {S.PROCESSING, S.CANCELLED, S.FAILED},
        S.PROCESSING: {S.PENDING, S.GENERATED, S.COMPLETED, S.CANCELLED, S.FAILED},
        S.GENERATED: {S.COMPLETED, S.FAILED},
        S.COMPLETED: {S.GENERATED},  # upscale retry (issue 15)
        S.FAILED: {S.PENDING},
        S.CANCELLED: {S.PENDING},
    }
    assert set(TRANSITIONS) == set(S), "every status has a row"


@pytest.mark.parametrize("current,new", LEGAL, ids=lambda s: s.value)
def test_every_legal_move(current, new):
    before = record(current)
    after = before.moved_to(new, error="why")
    assert after.status is new and after.error == "why"
    assert after.updated_at >= before.updated_at
    assert before.status is current, "records are immutable snapshots"
    check_transition("x", current, new)  # no exception


@pytest.mark.parametrize("current,new", ILLEGAL, ids=lambda s: s.value)
def test_every_illegal_move_raises(current, new):
    with pytest.raises(IllegalTransition) as info:
        record(current).moved_to(new)
    assert f"{current.value} -> {new.value}" in str(info.value)


def test_illegal_examples():
    for current, new in [(S.COMPLETED, S.PENDING), (S.GENERATED, S.CANCELLED), (S.PENDING, S.COMPLETED),
                         (S.PENDING, S.GENERATED), (S.FAILED, S.PROCESSING), (S.PENDING, S.PENDING)]:
        assert (current, new) in ILLEGAL


def test_reclaim_is_allowed():
    assert record(S.PROCESSING).moved_to(S.PENDING).status is S.PENDING
    assert S.PENDING in TRANSITIONS[S.PROCESSING]


def test_completed_only_goes_back_for_its_upscale():
    assert TRANSITIONS[S.COMPLETED] == {S.GENERATED}
    for new in set(S) - {S.GENERATED}:
        with pytest.raises(IllegalTransition):
            record(S.COMPLETED).moved_to(new)


def test_sets_agree_with_the_table():
    assert TERMINAL == {S.COMPLETED, S.FAILED, S.CANCELLED}
    # A terminal status leads nowhere but back to pending (resubmission) or, for completed, to
    # generated (an upscale retry).
    for status in TERMINAL:
        assert TRANSITIONS[status] <= {S.PENDING, S.GENERATED}
    # A non-terminal status always has a way forward to a terminal one.
    for status in S:
        if status not in TERMINAL:
            assert TRANSITIONS[status] & TERMINAL
    # Resubmittable = terminal with a way back to pending; everything but completed.
    assert {s for s in TERMINAL if S.PENDING in TRANSITIONS[s]} == {S.FAILED, S.CANCELLED}
    assert ACTIVE == (S.PENDING, S.PROCESSING, S.GENERATED)
    assert set(ACTIVE) | TERMINAL == set(S) and not set(ACTIVE) & TERMINAL
    assert CANCELLABLE == {S.PENDING, S.PROCESSING}
    assert CANCELLABLE <= set(ACTIVE)
    for status in CANCELLABLE:
        assert S.CANCELLED in TRANSITIONS[status]
    for status in S:  # exactly the statuses that may move to cancelled are cancellable
        assert (S.CANCELLED in TRANSITIONS[status]) == (status in CANCELLABLE)
        assert status.is_terminal == (status in TERMINAL)
        assert status.is_active == (status in ACTIVE)
        assert status.is_cancellable == (status in CANCELLABLE)


def test_rank_order():
    assert set(RANK) == set(S)
    assert RANK[S.PENDING] < RANK[S.PROCESSING] < RANK[S.GENERATED] < RANK[S.COMPLETED]
    assert RANK[S.COMPLETED] == RANK[S.FAILED] == RANK[S.CANCELLED] == max(RANK.values())
    assert [s for s in ACTIVE] == sorted(ACTIVE, key=RANK.__getitem__)
    # Within one attempt every forward move goes to a later rank; only the reclaim and resubmission go back.
    # Each starts a new attempt (attempt + 1), so clients ordering by (attempt, rank) see newer news.
    backward = {(a, b) for a, b in LEGAL if RANK[b] <= RANK[a]}
    assert backward == {(S.PROCESSING, S.PENDING), (S.FAILED, S.PENDING), (S.CANCELLED, S.PENDING),
                        (S.COMPLETED, S.GENERATED)}


def test_recovery_rule():
    # Nothing accepted is lost: pending stays queued, processing runs again, generated gets its upscale.
    assert RECOVERY == {S.PENDING: S.PENDING, S.PROCESSING: S.PENDING, S.GENERATED: S.GENERATED}
    assert set(RECOVERY) == set(ACTIVE)
    for source, target in RECOVERY.items():
        assert target == source or target in TRANSITIONS[source]
        assert target in ACTIVE
    # ... unless a job was running at max_restarts process deaths.
    assert RECOVERY_EXHAUSTED == {S.PROCESSING: S.FAILED, S.GENERATED: S.COMPLETED}
    for source, target in RECOVERY_EXHAUSTED.items():
        assert target in TRANSITIONS[source] and target in TERMINAL
    assert RESTART_REASON == FAILURE_MESSAGES[FailureCode.INTERRUPTED] == "interrupted by server restart"
    assert exhausted_reason(1) == "interrupted by server restart 1 time; it is not retried"
    assert exhausted_reason(3) == "interrupted by server restart 3 times; it is not retried"


def test_failure_codes():
    assert {code.value for code in FailureCode} == {
        "job_cancelled", "shutting_down", "interrupted", "out_of_memory", "generation_failed", "storage_error",
        "worker_lost", "internal_error", "invalid_adapter"}
    assert set(FAILURE_MESSAGES) <= set(FailureCode)


def test_lua_set_output():
    assert lua_set("is_terminal", TERMINAL) == (
        "local function is_terminal(st) return st == 'cancelled' or st == 'completed' or st == 'failed' end")
    assert lua_set("is_cancellable", CANCELLABLE) == (
        "local function is_cancellable(st) return st == 'pending' or st == 'processing' end")
    assert lua_set("one", {S.GENERATED}) == "local function one(st) return st == 'generated' end"
    # Ordered by rank, then by name: deterministic whatever the set's iteration order.
    assert lua_set("f", [S.FAILED, S.PENDING, S.GENERATED]) == (
        "local function f(st) return st == 'pending' or st == 'generated' or st == 'failed' end")


def lua_predicate(source: str, name: str) -> set[str]:
    match = re.search(rf"local function {name}\(st\) return (.*?) end\n", source)
    assert match, f"{name} not defined in the scripts"
    parts = [part.strip() for part in match.group(1).split(" or ")]
    values = set()
    for part in parts:
        value = re.fullmatch(r"st == '([a-z]+)'", part)
        assert value, f"unexpected term {part!r} in {name}"
        values.add(value.group(1))
    return values


def test_lua_predicates_match_the_python_sets():
    """Fails the day the scripts' status predicates diverge from ``states``."""
    assert lua_predicate(scripts.COMMON, "is_terminal") == {s.value for s in TERMINAL}
    assert lua_predicate(scripts.COMMON, "is_cancellable") == {s.value for s in CANCELLABLE}
    assert lua_predicate(scripts.CANCEL, "is_stoppable") == {s.value for s in STOPPABLE}
    for name in ("SUBMIT", "CLAIM", "MOVE", "STEP", "CANCEL"):
        source = getattr(scripts, name)
        assert source.startswith(scripts.COMMON), f"{name} does not start from COMMON"
        assert source.count("local function is_terminal(") == 1
        assert source.count("local function is_cancellable(") == 1
        # No script spells the terminal set out on its own instead of calling the predicate.
        body = source[len(scripts.COMMON):]
        assert "'completed' or" not in body and "'failed' or" not in body
