"""Calling the Redis backend's Lua scripts the way ``redis_engine.py`` and ``redis_worker.py`` do
(``register_script`` with the ARGV layout documented above each script), for tests/cluster/test_scripts_*.py."""


from __future__ import annotations

import json
import time

from server.cluster import scripts
from server.cluster.codec import GROUP, Keys, pairs, step_payload
from server.core.jobs import ImageFile, JobResult
from server.core.states import JobStatus
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

    # ARGV: P GROUP id now spec owner interest client max_queue max_per_interest maxlen [requester] [list ttl]
    #       [disk low] [seen result] [retry result]
    def submit(self, job_id=JOB, interest="i1", client="c1", owner="", max_queue=100, max_per_interest=100,
               spec_json=SPEC_JSON, retry: tuple[str, str] | None = None, disk_low=False):
        args = [PREFIX, GROUP, job_id, now(), spec_json, owner, interest, client, max_queue, max_per_interest, MAXLEN,
                "", "", "1" if disk_low else ""]
        if retry is not None:  # the API node asks for the upscale retry: (the result it saw, the retry's)
            args += [*retry]
        return self._submit(args=args)

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
