"""The SUBMIT and CLAIM scripts against a real redis-server and valkey-server (issue 12)."""

from __future__ import annotations

import json
from dataclasses import replace

from server.cluster.codec import GROUP, pairs, record_from_hash
from server.core.events import EventKind, JobEvent, PreviewImage
from server.core.states import FailureCode, JobStatus
from server.core.jobs import ImageFile
from tests.cluster.lua import JOB, PREFIX, RESULT, SPEC, SPEC_JSON
from tests.engine_helpers import spec


# -- SUBMIT ---------------------------------------------------------------------------------


def test_submit_created(lua):
    code, flat, preview = lua.submit(owner="key1")
    assert code == "created" and preview == []
    fields = pairs(flat)
    assert fields == lua.job()
    assert {k: fields[k] for k in ("status", "attempt", "failure", "error", "result", "deliveries", "cancel",
                                   "worker", "fence", "seq", "owner", "spec")} == {
        "status": "pending", "attempt": "1", "failure": "", "error": "", "result": "", "deliveries": "0",
        "cancel": "0", "worker": "", "fence": "0", "seq": "1", "owner": "key1", "spec": SPEC_JSON}
    record = record_from_hash(JOB, fields)
    assert record.spec == SPEC and record.status is JobStatus.PENDING and record.failure is None
    assert record.owner == "key1" and record.attempt == 1
    assert lua.r.zscore(lua.keys.pending, JOB) == 1
    assert lua.r.smembers(f"{PREFIX}int:{JOB}") == {"i1"}
    assert lua.r.smembers(f"{PREFIX}ia:i1") == {JOB}
    assert lua.r.zrange(lua.keys.client("c1"), 0, -1) == [JOB]
    [(msg, entry)] = lua.r.xrange(lua.keys.queue)
    assert entry == {"id": JOB} and fields["msg"] == msg
    [(eid, event)] = lua.events()
    assert event == {"k": "status", "status": "pending", "updated_at": fields["updated_at"], "result": "",
                     "error": "", "attempt": "1", "failure": ""}
    assert fields["last_event"] == eid
    assert lua.r.ttl(lua.keys.job(JOB)) == -1


def test_submit_joined(lua):
    assert lua.submit(interest="i1", client="c1")[0] == "created"
    code, flat, preview = lua.submit(interest="i2", client="c2")
    assert code == "joined" and preview == []
    assert pairs(flat)["status"] == "pending"
    assert lua.r.smembers(f"{PREFIX}int:{JOB}") == {"i1", "i2"}
    assert lua.r.smembers(f"{PREFIX}ia:i2") == {JOB}
    assert lua.r.zrange(lua.keys.client("c2"), 0, -1) == [JOB]
    assert lua.r.xlen(lua.keys.queue) == 1 and len(lua.events()) == 1, "no second run, no second event"
    assert lua.r.zcard(lua.keys.pending) == 1


def test_submit_joined_returns_the_latest_preview(lua):
    msg, fence = lua.running_job()
    shot = JobEvent(EventKind.PREVIEW, JOB, preview=PreviewImage(0, 3, 8, "QUJD", 4, 4, 1.5))
    assert lua.step(fence, msg, [shot]) == 0
    code, flat, preview = lua.submit(interest="i2")
    assert code == "joined" and pairs(flat)["status"] == "processing"
    preview = pairs(preview)
    assert json.loads(preview["v"])["step"] == 3 and preview["id"] == lua.events()[-1][0]


def test_submit_cached(lua):
    msg, fence = lua.running_job()
    assert lua.move(fence, JobStatus.COMPLETED, result=json.dumps(RESULT.to_dict())) == ["ok", "0"]
    queued = lua.r.xlen(lua.keys.queue)
    code, flat, preview = lua.submit(interest="i9", client="c9")
    assert code == "cached" and preview == []
    record = record_from_hash(JOB, pairs(flat))
    assert record.status is JobStatus.COMPLETED and record.result == RESULT
    assert lua.r.zrange(lua.keys.client("c9"), 0, -1) == [JOB], "the client's list shows it"
    assert not lua.r.exists(f"{PREFIX}ia:i9"), "a finished job takes no share of the interest"
    assert lua.r.xlen(lua.keys.queue) == queued and lua.job()["attempt"] == "1"


def test_submit_full(lua):
    assert lua.submit(max_queue=1)[0] == "created"
    other = spec("another").job_id
    assert lua.submit(job_id=other, interest="i2", client="c2", max_queue=1) == ["full", [], []]
    assert not lua.r.exists(lua.keys.job(other))
    assert not lua.r.exists(lua.keys.client("c2")) and not lua.r.exists(f"{PREFIX}ia:i2")
    assert lua.r.xlen(lua.keys.queue) == 1
    # Joining an existing job is not limited by the queue size.
    assert lua.submit(interest="i3", max_queue=1)[0] == "joined"


def test_submit_interest_full(lua):
    assert lua.submit(interest="i1", max_per_interest=1)[0] == "created"
    other = spec("another").job_id
    assert lua.submit(job_id=other, interest="i1", max_per_interest=1) == ["interest_full", [], []]
    assert not lua.r.exists(lua.keys.job(other))
    assert lua.submit(job_id=other, interest="i2", max_per_interest=1)[0] == "created", "another interest may"


def test_submit_refuses_only_new_work_while_the_disk_is_low(lua):
    """The API node found the shared output directory's disk nearly full (issue 16): a new job and a
    re-run are refused, with nothing written; a join and a cached answer are not."""
    assert lua.submit(disk_low=True) == ["no_space", [], []]
    assert not lua.r.exists(lua.keys.job(JOB)) and lua.r.xlen(lua.keys.queue) == 0
    assert not lua.r.exists(lua.keys.client("c1")) and not lua.r.exists(f"{PREFIX}ia:i1")
    msg, fence = lua.running_job()
    assert lua.submit(interest="i2", disk_low=True)[0] == "joined"
    assert lua.move(fence, JobStatus.COMPLETED, result=json.dumps(RESULT.to_dict())) == ["ok", "0"]
    assert lua.submit(interest="i3", disk_low=True)[0] == "cached"
    other = spec("another").job_id
    assert lua.submit(job_id=other, interest="i4")[0] == "created"
    assert lua.cancel(interest="i4", job_id=other)[0] == "cancelled"
    assert lua.submit(job_id=other, interest="i4", disk_low=True) == ["no_space", [], []], "a re-run is new work"
    assert lua.job(other)["status"] == "cancelled" and lua.job(other)["attempt"] == "1"


def test_resubmission_of_a_failed_job(lua):
    msg, fence = lua.running_job()
    assert lua.move(fence, JobStatus.FAILED, error="boom", failure=FailureCode.GENERATION_FAILED.value) == ["ok", "0"]
    before = lua.job()
    assert before["failure"] == "generation_failed" and lua.r.ttl(lua.keys.job(JOB)) > 0
    code, flat, _ = lua.submit(interest="i2")
    assert code == "created"
    fields = pairs(flat)
    assert fields["status"] == "pending" and fields["attempt"] == "2"
    assert fields["failure"] == "" and fields["error"] == "" and fields["result"] == ""
    assert fields["deliveries"] == "0" and fields["worker"] == "" and fields["cancel"] == "0"
    assert fields["created_at"] == before["created_at"], "the same job, run again"
    assert int(fields["fence"]) >= int(before["fence"]), "the fence never goes back"
    assert fields["msg"] != msg and lua.r.xrange(lua.keys.queue, fields["msg"], fields["msg"])
    record = record_from_hash(JOB, fields)
    assert record.attempt == 2 and record.failure is None and record.error is None
    assert lua.r.ttl(lua.keys.job(JOB)) == -1, "no longer expiring"
    [(eid, event)] = lua.events()
    assert event["status"] == "pending" and event["attempt"] == "2" and event["failure"] == ""
    assert fields["last_event"] == eid
    assert lua.r.smembers(f"{PREFIX}int:{JOB}") == {"i2"}, "old interests are gone"
    assert lua.r.zscore(lua.keys.pending, JOB) == 2
    # The new run claims with the new entry; the old one is stale.
    new_msg = lua.read("w2")
    assert new_msg == fields["msg"]
    code, flat = lua.claim(new_msg, "w2")
    assert code == "run" and pairs(flat)["fence"] == str(int(before["fence"]) + 1)


def test_resubmission_of_a_cancelled_job(lua):
    assert lua.submit()[0] == "created"
    assert lua.cancel()[0] == "cancelled"
    code, flat, _ = lua.submit()
    assert code == "created"
    assert pairs(flat)["attempt"] == "2" and pairs(flat)["failure"] == "" and pairs(flat)["status"] == "pending"


# -- CLAIM ----------------------------------------------------------------------------------


def test_claim_run(lua):
    assert lua.submit()[0] == "created"
    msg = lua.read()
    code, flat = lua.claim(msg)
    assert code == "run"
    fields = pairs(flat)
    assert fields["worker"] == "w1" and fields["fence"] == "1" and fields["deliveries"] == "1"
    assert fields["status"] == "pending" and fields == lua.job()
    assert len(lua.events()) == 1, "claiming emits nothing; the worker's move to processing does"


def test_claim_reclaim_of_a_dead_workers_job(lua):
    msg, fence = lua.running_job("w1")
    code, flat = lua.claim(msg, "w2")
    fields = pairs(flat)
    assert code == "run" and fields["status"] == "pending", "processing -> pending: the reclaim"
    assert fields["worker"] == "w2" and fields["fence"] == str(int(fence) + 1) and fields["deliveries"] == "2"
    assert lua.move(fence, JobStatus.GENERATED, "w1") == ["fenced", "pending"], "the old owner is fenced out"
    assert lua.move(fields["fence"], JobStatus.PROCESSING, "w2") == ["ok", "0"]


def test_claim_stale(lua):
    # An entry of an old run (not the job's current msg): acknowledged and deleted, job untouched.
    assert lua.submit()[0] == "created"
    current = lua.read()
    old = lua.r.xadd(lua.keys.queue, {"id": JOB})
    lua.r.xreadgroup(GROUP, "w1", {lua.keys.queue: ">"}, count=1)
    before = lua.job()
    assert lua.claim(old) == ["stale", []]
    assert lua.job() == before
    assert lua.r.xrange(lua.keys.queue, old, old) == [] and lua.pel(old) is None
    assert lua.pel(current) is not None
    # A finished job's entry is stale too.
    assert lua.claim(current)[0] == "run"
    fence = lua.job()["fence"]
    assert lua.move(fence, JobStatus.PROCESSING) == ["ok", "0"]
    assert lua.move(fence, JobStatus.COMPLETED, result=json.dumps(RESULT.to_dict())) == ["ok", "0"]
    lua.r.hset(lua.keys.job(JOB), "msg", current)  # as if the entry had survived
    assert lua.claim(current) == ["stale", []]
    assert lua.job()["status"] == "completed" and lua.job()["deliveries"] == "1"
    # A job that expired (no hash at all).
    gone = lua.r.xadd(lua.keys.queue, {"id": "f" * 64})
    assert lua.claim(gone, job_id="f" * 64) == ["stale", []]
    assert not lua.r.exists(lua.keys.job("f" * 64))


def test_claim_cancelled(lua):
    msg, fence = lua.running_job("w1")
    assert lua.cancel()[0] == "cancelling"
    # w1 dies before seeing the flag; w2 takes the entry over and finds the job cancelled.
    assert lua.claim(msg, "w2") == ["cancelled", []]
    fields = lua.job()
    assert fields["status"] == "cancelled" and fields["failure"] == "job_cancelled" and fields["error"] == "cancelled"
    assert fields["fence"] == str(int(fence) + 1)
    event = lua.status_events()[-1]
    assert event["status"] == "cancelled" and event["failure"] == "job_cancelled"
    assert fields["last_event"] == lua.events()[-1][0]
    lua.assert_terminal_cleanup(msg)


def test_claim_poison(lua):
    assert lua.submit()[0] == "created"
    msg = lua.read()
    for worker in ("w1", "w2"):
        code, flat = lua.claim(msg, worker, max_deliveries=2)
        assert code == "run"
    assert lua.claim(msg, "w3", max_deliveries=2) == ["poison", []]
    fields = lua.job()
    assert fields["status"] == "failed" and fields["failure"] == FailureCode.WORKER_LOST.value
    assert fields["error"] == "the job stopped 2 workers; it is not retried"
    assert fields["deliveries"] == "3"
    record = record_from_hash(JOB, fields)
    assert record.status is JobStatus.FAILED and record.failure is FailureCode.WORKER_LOST
    event = lua.status_events()[-1]
    assert event["status"] == "failed" and event["failure"] == "worker_lost"
    lua.assert_terminal_cleanup(msg)


# -- SUBMIT: the upscale retry (issue 15) ---------------------------------------------------

UPSCALE_SPEC = spec("lua upscale retry", upscale=True)
UPSCALE_JOB = UPSCALE_SPEC.job_id
UPSCALE_SPEC_JSON = json.dumps(UPSCALE_SPEC.to_dict(), sort_keys=True)
# The seed is 63-bit: the retry result must reach the hash byte for byte (Lua never re-encodes it).
CUT_SHORT = replace(RESULT, seeds=(2**63 - 25,), upscale_error="upscaling failed: out of GPU memory while upscaling")
RETRY = replace(CUT_SHORT, upscale_error=None)


def completed_without_upscale(lua, upscaler=True) -> tuple[str, str]:
    """An upscale job that completed with ``upscale_error``: (its queue entry, its result JSON)."""
    if upscaler:
        lua.r.set(lua.keys.upscaler, "1")
    assert lua.submit(job_id=UPSCALE_JOB, spec_json=UPSCALE_SPEC_JSON)[0] == "created"
    msg = lua.read()
    fence = pairs(lua.claim(msg, job_id=UPSCALE_JOB)[1])["fence"]
    assert lua.move(fence, JobStatus.PROCESSING, job_id=UPSCALE_JOB) == ["ok", "0"]
    result = json.dumps(CUT_SHORT.to_dict())
    assert lua.move(fence, JobStatus.COMPLETED, result=result, job_id=UPSCALE_JOB) == ["ok", "0"]
    return msg, result


def test_submit_retries_a_missing_upscale(lua):
    msg, result = completed_without_upscale(lua)
    assert lua.submit(job_id=UPSCALE_JOB, interest="i2", spec_json=UPSCALE_SPEC_JSON)[0] == "cached", \
        "without the API node's request: cached"
    retry = json.dumps(RETRY.to_dict())
    code, flat, preview = lua.submit(job_id=UPSCALE_JOB, interest="i2", client="c2", spec_json=UPSCALE_SPEC_JSON,
                                     retry=(result, retry))
    assert code == "upscale" and preview == []
    fields = pairs(flat)
    assert fields == lua.job(UPSCALE_JOB)
    assert {k: fields[k] for k in ("status", "attempt", "result", "error", "failure", "deliveries", "cancel", "worker")} == {
        "status": "generated", "attempt": "2", "result": retry, "error": "", "failure": "", "deliveries": "0",
        "cancel": "0", "worker": ""}
    record = record_from_hash(UPSCALE_JOB, fields)
    assert record.result == RETRY and record.result.seeds == (2**63 - 25,)
    assert lua.r.ttl(lua.keys.job(UPSCALE_JOB)) == -1, "no longer expiring"
    assert fields["msg"] != msg and lua.r.xrange(lua.keys.queue, fields["msg"], fields["msg"])
    assert lua.r.zscore(lua.keys.pending, UPSCALE_JOB) is not None, "queued: counted as pending work"
    assert lua.r.smembers(f"{PREFIX}int:{UPSCALE_JOB}") == {"i2"}
    assert lua.r.zrange(lua.keys.client("c2"), 0, -1) == [UPSCALE_JOB]
    [(eid, event)] = lua.events(UPSCALE_JOB)
    assert event["status"] == "generated" and event["attempt"] == "2" and event["result"] == retry
    assert fields["last_event"] == eid
    # A repeat while the retry waits joins it (even one asking for a retry again).
    assert lua.submit(job_id=UPSCALE_JOB, interest="i3", spec_json=UPSCALE_SPEC_JSON, retry=(result, retry))[0] == "joined"
    # A worker takes it to upscale the saved image, not to generate it again.
    new_msg = lua.read("w2")
    code, flat = lua.claim(new_msg, "w2", job_id=UPSCALE_JOB)
    assert code == "upscale"
    fields = pairs(flat)
    assert fields["status"] == "generated" and fields["worker"] == "w2" and fields["deliveries"] == "1"
    assert lua.r.zscore(lua.keys.pending, UPSCALE_JOB) is None and lua.r.sismember(lua.keys.running, UPSCALE_JOB)
    upscaled = json.dumps(replace(RETRY, images=(ImageFile("x.png", "x-upscaled.png"),)).to_dict())
    assert lua.move(fields["fence"], JobStatus.COMPLETED, worker="w2", result=upscaled, job_id=UPSCALE_JOB) == ["ok", "0"]
    assert [e["status"] for e in lua.status_events(UPSCALE_JOB)] == ["generated", "completed"]
    lua.assert_terminal_cleanup(new_msg, job_id=UPSCALE_JOB, interests=("i2", "i3"))


def test_submit_answers_from_the_cache_when_no_worker_can_upscale(lua):
    _, result = completed_without_upscale(lua, upscaler=False)
    before = lua.job(UPSCALE_JOB)
    code, flat, _ = lua.submit(job_id=UPSCALE_JOB, interest="i2", spec_json=UPSCALE_SPEC_JSON,
                               retry=(result, json.dumps(RETRY.to_dict())))
    assert code == "cached" and pairs(flat) == before == lua.job(UPSCALE_JOB)


def test_submit_retries_only_the_result_the_api_node_read(lua):
    """Another node's retry finished between this node's read and its retry: the job is not run again."""
    _, result = completed_without_upscale(lua)
    newer = json.dumps(replace(RETRY, images=(ImageFile("x.png", "x-upscaled.png"),)).to_dict())
    lua.r.hset(lua.keys.job(UPSCALE_JOB), "result", newer)
    code, flat, _ = lua.submit(job_id=UPSCALE_JOB, interest="i2", spec_json=UPSCALE_SPEC_JSON,
                               retry=(result, json.dumps(RETRY.to_dict())))
    assert code == "cached" and pairs(flat)["result"] == newer and pairs(flat)["attempt"] == "1"


def test_submit_upscale_retry_is_new_work_under_the_limits(lua):
    _, result = completed_without_upscale(lua)
    assert lua.submit(interest="i9")[0] == "created"  # another job fills the queue of one
    assert lua.submit(job_id=UPSCALE_JOB, interest="i2", spec_json=UPSCALE_SPEC_JSON, max_queue=1,
                      retry=(result, json.dumps(RETRY.to_dict()))) == ["full", [], []]
    assert lua.job(UPSCALE_JOB)["status"] == "completed"


def test_submit_upscale_retry_is_refused_while_the_disk_is_low(lua):
    _, result = completed_without_upscale(lua)
    before = lua.job(UPSCALE_JOB)
    assert lua.submit(job_id=UPSCALE_JOB, interest="i2", spec_json=UPSCALE_SPEC_JSON, disk_low=True,
                      retry=(result, json.dumps(RETRY.to_dict()))) == ["no_space", [], []]
    assert lua.job(UPSCALE_JOB) == before, "still completed, not queued"
    assert lua.submit(job_id=UPSCALE_JOB, interest="i2", spec_json=UPSCALE_SPEC_JSON, disk_low=True)[0] == "cached"


def test_claim_of_a_dead_workers_generated_job_upscales_it(lua):
    """A worker died while upscaling: the next one upscales the saved image (before: generated
    again from the start, the job set back to pending)."""
    msg, fence = lua.running_job("w1")
    assert lua.move(fence, JobStatus.GENERATED, result=json.dumps(RESULT.to_dict())) == ["ok", "0"]
    code, flat = lua.claim(msg, "w2")
    fields = pairs(flat)
    assert code == "upscale" and fields["status"] == "generated" and fields["result"] == json.dumps(RESULT.to_dict())
    assert fields["worker"] == "w2" and fields["fence"] == str(int(fence) + 1) and fields["deliveries"] == "2"
    assert lua.move(fence, JobStatus.COMPLETED, "w1") == ["fenced", "generated"], "the old owner is fenced out"


def test_claim_of_a_generated_job_past_max_deliveries_hands_it_over_to_complete(lua):
    """Its upscale crashed ``max_deliveries`` workers: the next worker gets it only to complete it with
    its saved image (``exhausted``), as a single node's RECOVERY_EXHAUSTED does; before, CLAIM ended it
    ``failed`` ("the job stopped 2 workers"), dropping that image (issue 15)."""
    msg, fence = lua.running_job("w1")
    result = json.dumps(RESULT.to_dict())
    assert lua.move(fence, JobStatus.GENERATED, result=result) == ["ok", "0"]
    assert lua.claim(msg, "w2", max_deliveries=2)[0] == "upscale"  # w1 died upscaling; w2 dies too
    code, flat = lua.claim(msg, "w3", max_deliveries=2)
    fields = pairs(flat)
    assert code == "exhausted" and fields == lua.job()
    assert fields["status"] == "generated" and fields["result"] == result and fields["failure"] == ""
    assert fields["worker"] == "w3" and fields["deliveries"] == "3" and fields["fence"] == str(int(fence) + 2)
    assert lua.r.sismember(lua.keys.running, JOB) and lua.r.zscore(lua.keys.pending, JOB) is None
    assert lua.status_events()[-1]["status"] == "generated", "the worker writes the end (Lua cannot: seeds)"
    done = json.dumps(replace(RESULT, upscale_error="upscaling stopped 2 workers; it is not retried").to_dict())
    assert lua.move(fields["fence"], JobStatus.COMPLETED, worker="w3", result=done) == ["ok", "0"]
    assert [e["status"] for e in lua.status_events()] == ["pending", "processing", "generated", "completed"]
    assert lua.job()["result"] == done
    lua.assert_terminal_cleanup(msg)
