"""Each Lua script of the Redis backend (SUBMIT, CLAIM, MOVE, STEP, CANCEL) against a real
redis-server and valkey-server, called the way ``redis_engine.py`` and ``redis_worker.py`` call them:
``register_script`` with the ARGV layout documented above each script (issue 12)."""

from __future__ import annotations

import json
import time

import pytest

from server.cluster import scripts
from server.cluster.codec import GROUP, Keys, event_from_entry, pairs, record_from_hash, step_payload
from server.core.events import EventKind, JobEvent, PreviewImage
from server.core.jobs import ImageFile, JobResult, Progress
from server.core.states import FailureCode, JobStatus
from tests.engine_helpers import spec

PREFIX = "t2itest:"
TTL = 600
MAXLEN = 256
SPEC = spec("lua scripts")
JOB = SPEC.job_id
SPEC_JSON = json.dumps(SPEC.to_dict(), sort_keys=True)
RESULT = JobResult(images=(ImageFile("x.png"),), seeds=(SPEC.seed,), generation_s=0.5)


def now() -> str:
    return repr(time.time())


class Lua:
    """The five scripts over one synchronous client, with the production ARGV layouts."""

    def __init__(self, client):
        self.r = client
        self.keys = Keys(PREFIX)
        self._submit = client.register_script(scripts.SUBMIT)
        self._claim = client.register_script(scripts.CLAIM)
        self._move = client.register_script(scripts.MOVE)
        self._step = client.register_script(scripts.STEP)
        self._cancel = client.register_script(scripts.CANCEL)
        client.xgroup_create(self.keys.queue, GROUP, id="0", mkstream=True)

    # ARGV: P GROUP id now spec owner interest client max_queue max_per_interest maxlen
    def submit(self, job_id=JOB, interest="i1", client="c1", owner="", max_queue=100, max_per_interest=100):
        return self._submit(args=[PREFIX, GROUP, job_id, now(), SPEC_JSON, owner, interest, client, max_queue,
                                  max_per_interest, MAXLEN])

    def read(self, worker="w1") -> str:
        """XREADGROUP as a worker does: the entry enters the worker's pending list. Returns its id."""
        reply = self.r.xreadgroup(GROUP, worker, {self.keys.queue: ">"}, count=1)
        [(_, [(msg, fields)])] = reply
        return msg

    # ARGV: P GROUP id msg worker max_deliveries now ttl maxlen
    def claim(self, msg, worker="w1", job_id=JOB, max_deliveries=3):
        return self._claim(args=[PREFIX, GROUP, job_id, msg, worker, max_deliveries, now(), TTL, MAXLEN])

    # ARGV: P GROUP id worker fence status updated_at result error terminal ttl maxlen failure
    def move(self, fence, status: JobStatus, worker="w1", result="", error="", failure="", job_id=JOB):
        return self._move(args=[PREFIX, GROUP, job_id, worker, fence, status.value, now(), result, error,
                                "1" if status.is_terminal else "0", TTL, MAXLEN, failure])

    # ARGV: P GROUP id worker fence msg maxlen beat [kind payload ts]...
    def step(self, fence, msg, events=(), beat=False, worker="w1", job_id=JOB):
        args = [PREFIX, GROUP, job_id, worker, fence, msg, MAXLEN, "1" if beat else "0"]
        for event in events:
            args.extend(step_payload(event))
        return self._step(args=args)

    # ARGV: P GROUP id interest now ttl maxlen dead_idle_ms
    def cancel(self, interest="i1", job_id=JOB, dead_idle_ms=60_000):
        return self._cancel(args=[PREFIX, GROUP, job_id, interest, now(), TTL, MAXLEN, dead_idle_ms])

    # -- reading state --------------------------------------------------------------------

    def job(self, job_id=JOB) -> dict[str, str]:
        return self.r.hgetall(self.keys.job(job_id))

    def events(self, job_id=JOB) -> list[tuple[str, dict[str, str]]]:
        return self.r.xrange(self.keys.events(job_id))

    def status_events(self, job_id=JOB) -> list[dict[str, str]]:
        return [fields for _, fields in self.events(job_id) if fields["k"] == "status"]

    def running_job(self, worker="w1") -> tuple[str, str]:
        """Submit, deliver, claim and move to processing: (msg, fence)."""
        assert self.submit()[0] == "created"
        msg = self.read(worker)
        code, flat = self.claim(msg, worker)
        assert code == "run"
        fence = pairs(flat)["fence"]
        assert self.move(fence, JobStatus.PROCESSING, worker) == ["ok", "0"]
        return msg, fence

    def pel(self, msg):
        """(consumer, idle ms, deliveries) of a queue entry, or None when it is not pending."""
        entries = self.r.xpending_range(self.keys.queue, GROUP, min=msg, max=msg, count=1)
        if not entries:
            return None
        return entries[0]["consumer"], entries[0]["time_since_delivered"], entries[0]["times_delivered"]

    def assert_terminal_cleanup(self, msg, job_id=JOB, interests=("i1",)):
        assert self.r.zscore(self.keys.pending, job_id) is None
        assert not self.r.sismember(self.keys.running, job_id)
        assert self.r.xrange(self.keys.queue, msg, msg) == [], "the queue entry is deleted"
        assert self.pel(msg) is None, "and acknowledged"
        assert self.job(job_id)["cancel"] == "0"
        for interest in interests:
            assert not self.r.sismember(f"{PREFIX}ia:{interest}", job_id)
        assert 0 < self.r.ttl(self.keys.job(job_id)) <= TTL
        assert 0 < self.r.ttl(self.keys.events(job_id)) <= TTL


@pytest.fixture
def lua(kv):
    client = kv.client()
    yield Lua(client)
    client.close()


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
    assert lua.move(fence, JobStatus.GENERATED) == ["ok", "0"]
    code, flat = lua.cancel()
    assert code == "not_cancellable" and pairs(flat)["status"] == "generated"
    assert lua.job()["cancel"] == "0" and lua.r.sismember(f"{PREFIX}int:{JOB}", "i1"), "nothing withdrawn"
    assert lua.move(fence, JobStatus.COMPLETED) == ["ok", "0"]
    code, flat = lua.cancel()
    assert code == "not_cancellable" and pairs(flat)["status"] == "completed"


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
