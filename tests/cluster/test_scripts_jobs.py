"""The MOVE, STEP and CANCEL scripts against a real redis-server and valkey-server (issue 12)."""

from __future__ import annotations

import json

from server.cluster.codec import (
    GROUP,
    event_from_entry,
    pairs,
    record_from_hash,
    step_payload,
)
from server.core.events import EventKind, JobEvent, PreviewImage
from server.core.jobs import Progress
from server.core.states import FailureCode, JobStatus
from tests.cluster.lua import JOB, PREFIX, RESULT

# -- MOVE -----------------------------------------------------------------------------------


def test_move_ok(lua):
    assert lua.submit()[0] == "created"
    msg = lua.read()
    fence = pairs(lua.claim(msg)[1])["fence"]
    assert lua.move(fence, JobStatus.PROCESSING) == ["ok", "0"]
    assert lua.job()["status"] == "processing"
    assert lua.r.zscore(lua.keys.pending, JOB) is None and lua.r.sismember(lua.keys.running, JOB)
    assert lua.move(fence, JobStatus.GENERATED, result=json.dumps(RESULT.to_dict())) == ["ok", "0"]
    assert [e["status"] for e in lua.status_events()] == ["pending", "processing", "generated"]
    assert lua.r.ttl(lua.keys.job(JOB)) == -1, "not terminal yet"
    assert lua.move(fence, JobStatus.COMPLETED, result=json.dumps(RESULT.to_dict())) == ["ok", "0"]
    record = record_from_hash(JOB, lua.job())
    assert record.status is JobStatus.COMPLETED and record.result == RESULT and record.failure is None
    lua.assert_terminal_cleanup(msg)


def test_move_stores_the_failure_and_emits_it(lua):
    msg, fence = lua.running_job()
    assert lua.move(fence, JobStatus.FAILED, error="CUDA out of memory",
                    failure=FailureCode.OUT_OF_MEMORY.value) == ["ok", "0"]
    fields = lua.job()
    assert fields["status"] == "failed" and fields["failure"] == "out_of_memory"
    assert fields["error"] == "CUDA out of memory"
    eid, entry = lua.events()[-1]
    assert entry["k"] == "status" and entry["status"] == "failed"
    assert entry["failure"] == "out_of_memory" and entry["error"] == "CUDA out of memory"
    assert fields["last_event"] == eid
    base = record_from_hash(JOB, fields)
    event = event_from_entry(base, eid, entry)
    assert event.is_terminal and event.record.failure is FailureCode.OUT_OF_MEMORY and event.event_id == eid
    lua.assert_terminal_cleanup(msg)


def test_move_reports_the_cancel_flag(lua):
    msg, fence = lua.running_job()
    assert lua.cancel()[0] == "cancelling"
    assert lua.move(fence, JobStatus.GENERATED) == ["ok", "1"]


def test_move_fenced(lua):
    msg, fence = lua.running_job()
    before, events = lua.job(), lua.events()
    assert lua.move(str(int(fence) + 1), JobStatus.GENERATED) == ["fenced", "processing"]
    assert lua.move(str(int(fence) - 1), JobStatus.GENERATED) == ["fenced", "processing"]
    assert lua.move(fence, JobStatus.GENERATED, worker="w2") == ["fenced", "processing"]
    assert lua.job() == before and lua.events() == events, "a fenced move changes nothing"
    assert lua.move(fence, JobStatus.FAILED, error="x", failure="internal_error") == ["ok", "0"]
    after, events = lua.job(), lua.events()
    # Terminal: even the right owner and fence change nothing any more.
    assert lua.move(fence, JobStatus.COMPLETED) == ["fenced", "failed"]
    assert lua.job() == after and lua.events() == events
    assert lua.move("1", JobStatus.PROCESSING, job_id="e" * 64) == ["fenced", ""], "a missing job"


# -- STEP -----------------------------------------------------------------------------------


def progress_event(step):
    return JobEvent(EventKind.PROGRESS, JOB, progress=Progress(0, step, 8, step, 8, 0.1 * step, 0.1), timestamp=2.5)


def preview_event(step):
    return JobEvent(EventKind.PREVIEW, JOB, preview=PreviewImage(0, step, 8, "QUJD", 4, 4, 1.5), timestamp=3.5)


def test_step_appends_events(lua):
    msg, fence = lua.running_job()
    sent = [progress_event(1), preview_event(1), progress_event(2), preview_event(2)]
    assert lua.step(fence, msg, sent) == 0
    entries = lua.events()[2:]  # after pending and processing
    assert [fields["k"] for _, fields in entries] == ["progress", "preview", "progress", "preview"]
    for (eid, fields), event in zip(entries, sent):
        kind, payload, ts = step_payload(event)
        assert fields == {"k": kind, "v": payload, "ts": ts}
    base = record_from_hash(JOB, lua.job())
    decoded = [event_from_entry(base, eid, fields) for eid, fields in entries]
    assert [e.progress.step for e in decoded if e.kind is EventKind.PROGRESS] == [1, 2]
    assert [e.preview.step for e in decoded if e.kind is EventKind.PREVIEW] == [1, 2]
    latest = lua.r.hgetall(f"{PREFIX}pv:{JOB}")
    assert latest == {"id": entries[-1][0], "v": step_payload(sent[-1])[1], "ts": "3.5"}
    assert lua.job()["status"] == "processing" and lua.job()["last_event"] == lua.events()[1][0], \
        "step events are not status events"
    assert lua.step(fence, msg) == 0, "an empty step is fine"


def test_step_heartbeat(lua):
    msg, fence = lua.running_job()
    # Make the entry look long idle (as a frozen worker's would), without waiting.
    lua.r.xclaim(lua.keys.queue, GROUP, "w1", 0, [msg], idle=100_000, justid=True)
    assert lua.pel(msg)[1] >= 100_000
    assert lua.step(fence, msg, [progress_event(1)], beat=False) == 0
    assert lua.pel(msg)[1] >= 100_000, "no beat: idle time untouched"
    assert lua.step(fence, msg, beat=True) == 0
    consumer, idle, _ = lua.pel(msg)
    assert consumer == "w1" and idle < 10_000, "the beat reset the idle time"


def test_step_reports_cancel(lua):
    msg, fence = lua.running_job()
    assert lua.step(fence, msg, [progress_event(1)]) == 0
    assert lua.cancel()[0] == "cancelling"
    assert lua.step(fence, msg, [progress_event(2)]) == 1
    assert [f["k"] for _, f in lua.events()][-1] == "progress", "the events are still written"


def test_step_fenced(lua):
    assert lua.submit()[0] == "created"
    msg = lua.read()
    fence = pairs(lua.claim(msg)[1])["fence"]
    assert lua.step(fence, msg, [progress_event(1)]) == -1, "not processing yet"
    assert lua.move(fence, JobStatus.PROCESSING) == ["ok", "0"]
    count = len(lua.events())
    assert lua.step(str(int(fence) + 1), msg, [progress_event(1)], beat=True) == -1
    assert lua.step(fence, msg, [progress_event(1)], worker="w2") == -1
    assert lua.step(fence, msg, [progress_event(1)], job_id="d" * 64) == -1
    assert len(lua.events()) == count, "a fenced step writes nothing"
    assert lua.pel(msg)[0] == "w1"
    assert lua.move(fence, JobStatus.GENERATED) == ["ok", "0"]
    # Upscaling: still on the worker's device, which beats through STEP (a -1 here made the worker
    # fence itself out of every upscale longer than its beat period, issue 15).
    assert lua.step(fence, msg, beat=True) == 0, "generated: the worker still beats"
    assert lua.pel(msg)[0] == "w1"
    assert lua.move(fence, JobStatus.COMPLETED, result=json.dumps(RESULT.to_dict())) == ["ok", "0"]
    assert lua.step(fence, msg, beat=True) == -1, "finished"


# -- CANCEL ---------------------------------------------------------------------------------


def test_cancel_missing(lua):
    assert lua.cancel() == ["missing", []]


def test_cancel_not_cancellable(lua):
    msg, fence = lua.running_job()
    assert lua.move(fence, JobStatus.COMPLETED, result=json.dumps(RESULT.to_dict())) == ["ok", "0"]
    code, flat = lua.cancel()
    assert code == "not_cancellable" and pairs(flat)["status"] == "completed"
    assert lua.job()["cancel"] == "0" and lua.r.exists(lua.keys.cancel_wake(JOB)) == 0


def generated_job(lua) -> tuple[str, str]:
    msg, fence = lua.running_job()
    assert lua.move(fence, JobStatus.GENERATED, result=json.dumps(RESULT.to_dict())) == ["ok", "0"]
    return msg, fence


def test_cancel_generated_asks_its_worker_to_stop_the_upscale(lua):
    # Issue 15: as on single node, a cancel stops the upscale; the job completes with its image.
    msg, fence = generated_job(lua)
    code, flat = lua.cancel(dead_idle_ms=60_000)
    assert code == "cancelling"
    fields = pairs(flat)
    assert fields["status"] == "generated" and fields["cancel"] == "1" and fields["fence"] == fence
    assert lua.r.smembers(f"{PREFIX}int:{JOB}") == set()
    assert lua.r.lrange(lua.keys.cancel_wake(JOB), 0, -1) == ["1"], "the worker's heartbeat is woken"
    assert 0 < lua.r.ttl(lua.keys.cancel_wake(JOB)) <= 600
    assert lua.status_events()[-1]["status"] == "generated", "no status change yet"
    assert lua.step(fence, msg, beat=True) == 1, "the upscaling worker reads the flag"
    stopped = {**RESULT.to_dict(), "upscale_error": "upscaling stopped: cancelled"}
    assert lua.move(fence, JobStatus.COMPLETED, result=json.dumps(stopped)) == ["ok", "1"]
    assert lua.job()["status"] == "completed" and lua.r.exists(lua.keys.cancel_wake(JOB)) == 0
    lua.assert_terminal_cleanup(msg)


def test_cancel_generated_whose_worker_looks_dead_is_left_to_the_reclaim(lua):
    # Its image exists: not cancelled (a processing job would be, at once), flagged instead; the
    # worker that reclaims the entry completes it with that image (CLAIM: stop_upscale).
    msg, fence = generated_job(lua)
    lua.r.xclaim(lua.keys.queue, GROUP, "w1", 0, [msg], idle=100_000, justid=True)
    code, flat = lua.cancel(dead_idle_ms=60_000)
    assert code == "cancelling" and pairs(flat)["status"] == "generated" and pairs(flat)["cancel"] == "1"
    _, claimed, *_ = lua.r.xautoclaim(lua.keys.queue, GROUP, "w2", min_idle_time=60_000, start_id="0-0")
    assert [entry[0] for entry in claimed] == [msg]
    code, flat = lua.claim(msg, worker="w2")
    assert code == "stop_upscale"
    fields = pairs(flat)
    assert fields["status"] == "generated" and fields["worker"] == "w2" and fields["fence"] == str(int(fence) + 1)
    assert record_from_hash(JOB, fields).result == RESULT
    assert lua.move(fence, JobStatus.COMPLETED) == ["fenced", "generated"], "the frozen owner is fenced out"
    assert lua.move(fields["fence"], JobStatus.COMPLETED, worker="w2", result=json.dumps(RESULT.to_dict())) == ["ok", "1"]
    lua.assert_terminal_cleanup(msg)


def test_claim_cancels_a_flagged_processing_job(lua):
    msg, fence = lua.running_job()
    assert lua.cancel()[0] == "cancelling"
    assert lua.claim(msg, worker="w2") == ["cancelled", []]
    assert lua.job()["status"] == "cancelled"


def test_cancel_kept(lua):
    assert lua.submit(interest="i1")[0] == "created"
    assert lua.submit(interest="i2")[0] == "joined"
    code, flat = lua.cancel(interest="i1")
    assert code == "kept" and pairs(flat)["status"] == "pending"
    assert lua.r.smembers(f"{PREFIX}int:{JOB}") == {"i2"}
    assert not lua.r.sismember(f"{PREFIX}ia:i1", JOB) and lua.r.sismember(f"{PREFIX}ia:i2", JOB)
    assert len(lua.events()) == 1 and lua.r.zscore(lua.keys.pending, JOB) is not None


def test_cancel_cancelled_pending(lua):
    assert lua.submit()[0] == "created"
    msg = lua.job()["msg"]
    code, flat = lua.cancel()
    assert code == "cancelled"
    fields = pairs(flat)
    assert fields["status"] == "cancelled" and fields["failure"] == "job_cancelled" and fields["error"] == "cancelled"
    record = record_from_hash(JOB, fields)
    assert record.failure is FailureCode.CANCELLED and record.status is JobStatus.CANCELLED
    event = lua.status_events()[-1]
    assert event["status"] == "cancelled" and event["failure"] == "job_cancelled"
    assert fields["fence"] == "1", "finish bumps the fence"
    lua.assert_terminal_cleanup(msg)
    assert lua.r.xlen(lua.keys.queue) == 0


def test_cancel_cancelling_running(lua):
    msg, fence = lua.running_job()
    code, flat = lua.cancel(dead_idle_ms=60_000)
    assert code == "cancelling"
    fields = pairs(flat)
    assert fields["status"] == "processing" and fields["cancel"] == "1" and fields["fence"] == fence
    assert lua.r.smembers(f"{PREFIX}int:{JOB}") == set()
    assert lua.pel(msg) is not None and lua.r.sismember(lua.keys.running, JOB)
    assert lua.status_events()[-1]["status"] == "processing"
    # The owner sees the flag and ends the job itself.
    assert lua.step(fence, msg) == 1
    assert lua.move(fence, JobStatus.CANCELLED, error="cancelled", failure="job_cancelled") == ["ok", "1"]
    lua.assert_terminal_cleanup(msg)


def test_submit_joining_a_job_being_cancelled_withdraws_the_cancel(lua):
    # Issue 15: A's interest left (cancel requested), B's identical request joins before the worker
    # reads the flag: the job goes on for B.
    msg, fence = lua.running_job()
    assert lua.cancel(interest="i1")[0] == "cancelling"
    code, flat, _ = lua.submit(interest="i2", client="c2")
    assert code == "joined" and pairs(flat)["cancel"] == "0"
    assert lua.step(fence, msg) == 0, "the worker is told to go on"
    assert lua.move(fence, JobStatus.COMPLETED, result=json.dumps(RESULT.to_dict())) == ["ok", "0"]
    assert lua.job()["status"] == "completed"


def test_move_cancelled_for_a_job_wanted_again_requeues_it(lua):
    # The worker had already read the flag and stopped when B joined: a fresh attempt, not a cancel.
    msg, fence = lua.running_job()
    assert lua.cancel(interest="i1")[0] == "cancelling"
    assert lua.step(fence, msg) == 1
    assert lua.submit(interest="i2", client="c2")[0] == "joined"
    assert lua.move(fence, JobStatus.CANCELLED, error="cancelled", failure="job_cancelled") == ["requeued", "0"]
    fields = lua.job()
    assert {k: fields[k] for k in ("status", "attempt", "cancel", "deliveries", "worker", "error", "failure")} == {
        "status": "pending", "attempt": "2", "cancel": "0", "deliveries": "0", "worker": "", "error": "",
        "failure": ""}
    assert fields["msg"] != msg and lua.pel(msg) is None and lua.r.xrange(lua.keys.queue, msg, msg) == []
    assert lua.r.zscore(lua.keys.pending, JOB) is not None and not lua.r.sismember(lua.keys.running, JOB)
    assert lua.r.smembers(f"{PREFIX}int:{JOB}") == {"i2"} and lua.r.ttl(lua.keys.job(JOB)) == -1
    assert [e["status"] for e in lua.status_events()][-2:] == ["processing", "pending"]
    assert lua.move(fence, JobStatus.COMPLETED) == ["fenced", "pending"], "the old run is over"
    new_msg = lua.read("w2")
    assert new_msg == fields["msg"]
    code, flat = lua.claim(new_msg, worker="w2")
    assert code == "run" and pairs(flat)["attempt"] == "2"


def test_cancel_cancelled_when_the_owner_looks_dead(lua):
    msg, fence = lua.running_job()
    lua.r.xclaim(lua.keys.queue, GROUP, "w1", 0, [msg], idle=100_000, justid=True)
    code, flat = lua.cancel(dead_idle_ms=60_000)
    assert code == "cancelled" and pairs(flat)["status"] == "cancelled"
    assert pairs(flat)["fence"] == str(int(fence) + 1)
    assert lua.move(fence, JobStatus.GENERATED) == ["fenced", "cancelled"], "the frozen owner is fenced out"
    lua.assert_terminal_cleanup(msg)


def test_cancel_cancelled_when_the_entry_is_not_pending(lua):
    msg, fence = lua.running_job()
    lua.r.xack(lua.keys.queue, GROUP, msg)  # no owner holds the entry any more
    assert lua.cancel(dead_idle_ms=60_000)[0] == "cancelled"
    assert lua.job()["status"] == "cancelled"
