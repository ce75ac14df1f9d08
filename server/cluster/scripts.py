"""The Lua scripts: every multi-key step of the Redis backend is one atomic script.

Keys are built inside the scripts from a prefix (ARGV[1]), so the backend targets a standalone
Redis/Valkey (optionally with replicas), not Redis Cluster. Each script's contract:

- SUBMIT: dedup + record + enqueue + first status event + the client's job list, at once. A new
  interest joining a job whose cancel was requested withdraws the request (``cancel`` = 0). A
  completed job whose upscale is missing (``JobRecord.upscale_missing``) runs that upscale again
  (completed -> generated, a new attempt) when the API node asks for it with the result it saw and
  a worker with an upscaler has announced itself (key ``upscaler``); else it is answered as cached.
  While the API node found the shared output directory's disk nearly full (``DiskSpace``), new work
  (a new job, a re-run, the upscale retry) is refused (``no_space``); joins and cached answers are not.
- CLAIM: a worker took a queue entry: check it is still wanted, count the delivery (ending a job
  that crashed ``max_deliveries`` workers as failed), bump the fence and name the owner. A
  ``generated`` job (its worker died while upscaling, or an upscale retry) is taken over to upscale
  its saved image (``upscale``), never to generate it again; one whose cancel was requested, or
  whose upscale has crashed ``max_deliveries`` workers, only to complete it with its image
  (``stop_upscale``, ``exhausted``: the worker writes the result's ``upscale_error``), as
  ``states.RECOVERY_EXHAUSTED`` says (generated -> completed).
- MOVE: a worker-side state change, fenced by (worker, fence): a worker whose job was taken over
  (or cancelled, or finished by someone else) changes nothing. A worker reporting ``cancelled``
  for a job that someone wants again (an interest joined after the worker read the cancel flag)
  requeues it as a new attempt instead.
- STEP: a worker's coalesced step events (progress, latest preview) + heartbeat (XCLAIM JUSTID),
  fenced the same way; answers whether the job was asked to cancel.
- CANCEL: withdraw an interest; cancel a pending job at once, ask a running (processing or
  generated) job's owner to stop: set ``cancel`` and push to ``cx:{id}``, which the owner's
  heartbeat waits on (BLPOP), so it reads the flag at once, not at its next beat. A processing job
  whose owner looks dead is cancelled at once; a generated one is left to the reclaim (CLAIM).

Status sets (terminal, cancellable, stoppable) are generated from ``server.core.states``, the one
state table; so is the reclaim move (processing -> pending), which CLAIM makes for a dead worker's job.

Job hash fields: spec status created_at updated_at result error failure owner attempt (the record), plus
worker fence deliveries cancel msg seq last_event (control); list ``cx:{id}`` is the cancel wake-up.
Fields are strings: Lua never decodes the spec or result JSON (cjson would round a 63-bit seed), so
the upscale retry's result (``upscale_error`` cleared) is written by the API node, which compares it
with what it read (ARGV), not by the script.
"""

from __future__ import annotations

from server.core.states import (CANCELLABLE, RECOVERY_EXHAUSTED, STOPPABLE, TERMINAL, TRANSITIONS, FailureCode,
                                JobStatus, lua_set)

# The reclaim and the upscale retry are moves of the state table; asserted here so the scripts cannot
# drift from it.
assert JobStatus.PENDING in TRANSITIONS[JobStatus.PROCESSING]
assert JobStatus.GENERATED in TRANSITIONS[JobStatus.COMPLETED]
assert RECOVERY_EXHAUSTED[JobStatus.GENERATED] is JobStatus.COMPLETED  # CLAIM's ``exhausted``: the worker completes it

COMMON = r"""
local P = ARGV[1]
local GROUP = ARGV[2]
local function jk(id) return P .. 'job:' .. id end
""" + lua_set("is_terminal", TERMINAL) + "\n" + lua_set("is_cancellable", CANCELLABLE) + r"""
local function emit_status(id, maxlen)
  local f = redis.call('HMGET', jk(id), 'status', 'updated_at', 'result', 'error', 'attempt', 'failure')
  local eid = redis.call('XADD', P .. 'ev:' .. id, 'MAXLEN', '~', maxlen, '*', 'k', 'status',
    'status', f[1], 'updated_at', f[2], 'result', f[3] or '', 'error', f[4] or '', 'attempt', f[5] or '1',
    'failure', f[6] or '')
  redis.call('HSET', jk(id), 'last_event', eid)
  return eid
end
local function on_terminal(id, ttl)
  redis.call('ZREM', P .. 'pending', id)
  redis.call('SREM', P .. 'running', id)
  for _, who in ipairs(redis.call('SMEMBERS', P .. 'int:' .. id)) do
    redis.call('SREM', P .. 'ia:' .. who, id)
  end
  redis.call('HSET', jk(id), 'cancel', '0')
  redis.call('DEL', P .. 'cx:' .. id)
  local msg = redis.call('HGET', jk(id), 'msg')
  if msg and msg ~= '' then
    redis.call('XACK', P .. 'queue', GROUP, msg)
    redis.call('XDEL', P .. 'queue', msg)
  end
  for _, k in ipairs({jk(id), P .. 'ev:' .. id, P .. 'pv:' .. id, P .. 'int:' .. id}) do
    redis.call('EXPIRE', k, ttl)
  end
end
local function finish(id, status, err, failure, now, ttl, maxlen)
  redis.call('HSET', jk(id), 'status', status, 'error', err, 'failure', failure, 'updated_at', now)
  redis.call('HINCRBY', jk(id), 'fence', 1)
  local eid = emit_status(id, maxlen)
  on_terminal(id, ttl)
  return eid
end
"""

# ARGV: P GROUP id now spec owner interest client max_queue max_per_interest maxlen [requester] [list ttl]
#       [disk low] [seen result] [retry result]
# -> {code, hash-as-flat-list, preview-hash-as-flat-list[, jobs ahead]}
# code: created | joined | cached | upscale (the upscale retry, queued) | no_space | full | interest_full
#       | requester_full
# disk low ('1'): the API node read less than min_free_disk_bytes free on the shared output directory;
# the script refuses new work only, so a join or a cached answer is never refused for it.
# A requester (core.fairness: API key or address) may have max_per_interest unfinished jobs it
# created, in set rq:{requester}; finished ones are dropped from it lazily, here.
# Upscale retry: a completed job whose result is still exactly ``seen result`` (one the API node found
# missing its upscale) becomes generated with ``retry result``, as new work (the same limits), if a
# worker announced an upscaler (key ``upscaler``: set by such workers, never cleared; one without an
# upscaler that claims the retry completes it with "upscaling is not available on this server").
SUBMIT = COMMON + r"""
local id, now, interest, client = ARGV[3], ARGV[4], ARGV[7], ARGV[8]
local key = jk(id)
local st = redis.call('HGET', key, 'status')
local function link(active)
  if client ~= '' then
    -- A client's list keeps its newest 200 jobs (what get_client_jobs shows) and expires with the
    -- results, so made-up client ids cannot grow Redis without bound.
    local cl = P .. 'cl:' .. client
    redis.call('ZADD', cl, 'NX', now, id)
    redis.call('ZREMRANGEBYRANK', cl, 0, -201)
    if ARGV[13] and ARGV[13] ~= '' then redis.call('EXPIRE', cl, ARGV[13]) end
  end
  if active then
    redis.call('SADD', P .. 'int:' .. id, interest)
    redis.call('SADD', P .. 'ia:' .. interest, id)
  end
end
if st and not is_terminal(st) then
  link(true)
  -- Its last interest may have just left (cancel requested, the job still running): whoever
  -- wants it now keeps it alive. A worker that already stopped it requeues it at MOVE.
  if redis.call('HGET', key, 'cancel') == '1' then redis.call('HSET', key, 'cancel', '0') end
  return {'joined', redis.call('HGETALL', key), redis.call('HGETALL', P .. 'pv:' .. id)}
end
local retry = st == 'completed' and ARGV[15] and ARGV[15] ~= '' and redis.call('HGET', key, 'result') == ARGV[15]
  and redis.call('EXISTS', P .. 'upscaler') == 1
if st == 'completed' and not retry then
  link(false)
  return {'cached', redis.call('HGETALL', key), {}}
end
if ARGV[14] == '1' then return {'no_space', {}, {}} end
if redis.call('ZCARD', P .. 'pending') >= tonumber(ARGV[9]) then return {'full', {}, {}} end
if redis.call('SCARD', P .. 'ia:' .. interest) >= tonumber(ARGV[10]) then return {'interest_full', {}, {}} end
local rq = (ARGV[12] and ARGV[12] ~= '') and (P .. 'rq:' .. ARGV[12]) or nil
if rq then
  local first = nil
  for _, j in ipairs(redis.call('SMEMBERS', rq)) do
    local s = redis.call('HGET', jk(j), 'status')
    if (not s) or is_terminal(s) then redis.call('SREM', rq, j) else
      local sc = redis.call('ZSCORE', P .. 'pending', j)
      if sc and ((not first) or tonumber(sc) < first) then first = tonumber(sc) end
    end
  end
  if redis.call('SCARD', rq) >= tonumber(ARGV[10]) then
    -- jobs that finish before this requester's first one: the running ones, the pending ahead
    local ahead = redis.call('SCARD', P .. 'running')
    if first then ahead = ahead + redis.call('ZCOUNT', P .. 'pending', '-inf', '(' .. first) end
    return {'requester_full', {}, {}, ahead}
  end
  redis.call('SADD', rq, id)
end
local attempt = 1
if st then  -- failed or cancelled before: run it again; completed: its upscale (retry). Same id.
  attempt = tonumber(redis.call('HGET', key, 'attempt') or '1') + 1
  redis.call('DEL', P .. 'ev:' .. id, P .. 'pv:' .. id, P .. 'int:' .. id)
  redis.call('PERSIST', key)
else
  redis.call('HSET', key, 'spec', ARGV[5], 'owner', ARGV[6], 'created_at', now, 'fence', 0)
end
local seq = redis.call('INCR', P .. 'seq')
local msg = redis.call('XADD', P .. 'queue', '*', 'id', id)
redis.call('HSET', key, 'status', retry and 'generated' or 'pending', 'updated_at', now,
  'result', retry and ARGV[16] or '', 'error', '', 'failure', '', 'attempt', attempt,
  'deliveries', 0, 'cancel', '0', 'worker', '', 'msg', msg, 'seq', seq)
redis.call('ZADD', P .. 'pending', seq, id)
link(true)
emit_status(id, ARGV[11])
return {retry and 'upscale' or 'created', redis.call('HGETALL', key), {}}
"""

# ARGV: P GROUP id msg worker max_deliveries now ttl maxlen -> {code, hash}
# code: run | upscale (upscale the generated job's saved image) | stop_upscale (complete the generated
# job with its image, run nothing) | exhausted (the same, its upscale having crashed max_deliveries
# workers) | stale | cancelled | poison
CLAIM = COMMON + r"""
local id, msg, worker, now, ttl, maxlen = ARGV[3], ARGV[4], ARGV[5], ARGV[7], ARGV[8], ARGV[9]
local key = jk(id)
local f = redis.call('HMGET', key, 'status', 'msg', 'cancel')
if (not f[1]) or is_terminal(f[1]) or f[2] ~= msg then  -- finished, expired, or an old run's entry
  redis.call('XACK', P .. 'queue', GROUP, msg)
  redis.call('XDEL', P .. 'queue', msg)
  return {'stale', {}}
end
local deliveries = redis.call('HINCRBY', key, 'deliveries', 1)
if f[3] == '1' and is_cancellable(f[1]) then
  finish(id, 'cancelled', 'cancelled', '""" + FailureCode.CANCELLED.value + r"""', now, ttl, maxlen)
  return {'cancelled', {}}
end
if f[3] == '1' then
  -- Generated, its cancel requested while its worker looked dead (or before the worker, which then
  -- died, read it). Its image exists, so it is not cancelled: this worker takes it over only to
  -- complete it with that image and its upscale_error, as a stopped upscale does. Nothing runs.
  redis.call('HINCRBY', key, 'fence', 1)
  redis.call('HSET', key, 'worker', worker)
  return {'stop_upscale', redis.call('HGETALL', key)}
end
local exhausted = deliveries > tonumber(ARGV[6])
if exhausted and f[1] ~= 'generated' then
  finish(id, 'failed', 'the job stopped ' .. (deliveries - 1) .. ' workers; it is not retried',
    '""" + FailureCode.WORKER_LOST.value + r"""', now, ttl, maxlen)
  return {'poison', {}}
end
redis.call('HINCRBY', key, 'fence', 1)
if f[1] == 'generated' then
  -- Its image is saved (an upscale retry, or its worker died while upscaling): only the upscale runs,
  -- or, once the upscale has crashed max_deliveries workers, nothing: the job completes with its image
  -- (not failed, which would drop that image). The worker writes the result: Lua cannot (seeds).
  redis.call('HSET', key, 'worker', worker)
  redis.call('ZREM', P .. 'pending', id)
  redis.call('SADD', P .. 'running', id)
  return {exhausted and 'exhausted' or 'upscale', redis.call('HGETALL', key)}
end
-- A job taken over from a dead worker starts again from the queue's view: pending.
redis.call('HSET', key, 'worker', worker, 'status', 'pending')
return {'run', redis.call('HGETALL', key)}
"""

# ARGV: P GROUP id worker fence status updated_at result error terminal ttl maxlen failure
# -> {'ok', cancel} | {'fenced', status} | {'requeued', '0'}
MOVE = COMMON + r"""
local id = ARGV[3]
local key = jk(id)
local f = redis.call('HMGET', key, 'worker', 'fence', 'status', 'cancel')
if f[1] ~= ARGV[4] or f[2] ~= ARGV[5] or (not f[3]) or is_terminal(f[3]) then
  return {'fenced', f[3] or ''}
end
if ARGV[6] == 'cancelled' and redis.call('SCARD', P .. 'int:' .. id) > 0 then
  -- Stopped for lack of interest just as a new interest joined: a fresh attempt instead (the
  -- reclaim move processing -> pending), under a new queue entry; this worker's run is over.
  redis.call('XACK', P .. 'queue', GROUP, redis.call('HGET', key, 'msg'))
  redis.call('XDEL', P .. 'queue', redis.call('HGET', key, 'msg'))
  local seq = redis.call('INCR', P .. 'seq')
  local msg = redis.call('XADD', P .. 'queue', '*', 'id', id)
  local attempt = tonumber(redis.call('HGET', key, 'attempt') or '1') + 1
  redis.call('HINCRBY', key, 'fence', 1)
  redis.call('HSET', key, 'status', 'pending', 'updated_at', ARGV[7], 'result', '', 'error', '', 'failure', '',
    'attempt', attempt, 'deliveries', 0, 'cancel', '0', 'worker', '', 'msg', msg, 'seq', seq)
  redis.call('SREM', P .. 'running', id)
  redis.call('ZADD', P .. 'pending', seq, id)
  emit_status(id, ARGV[12])
  return {'requeued', '0'}
end
redis.call('HSET', key, 'status', ARGV[6], 'updated_at', ARGV[7], 'result', ARGV[8], 'error', ARGV[9],
  'failure', ARGV[13])
if ARGV[6] == 'processing' then
  redis.call('ZREM', P .. 'pending', id)
  redis.call('SADD', P .. 'running', id)
end
emit_status(id, ARGV[12])
if ARGV[10] == '1' then on_terminal(id, ARGV[11]) end
return {'ok', f[4] or '0'}
"""

# ARGV: P GROUP id worker fence msg maxlen beat [kind payload ts]... -> 1 cancel, 0 go on, -1 fenced
# A job on a worker's device: denoising, or upscaling after its image was saved. The worker beats
# through STEP in both (an upscale longer than a beat period must not read as a dead worker).
STEP = COMMON + lua_set("on_gpu", (JobStatus.PROCESSING, JobStatus.GENERATED)) + r"""
local id = ARGV[3]
local key = jk(id)
local f = redis.call('HMGET', key, 'worker', 'fence', 'status', 'cancel')
if f[1] ~= ARGV[4] or f[2] ~= ARGV[5] or not on_gpu(f[3]) then return -1 end
local i = 9
while ARGV[i] do
  local eid = redis.call('XADD', P .. 'ev:' .. id, 'MAXLEN', '~', ARGV[7], '*', 'k', ARGV[i], 'v', ARGV[i + 1], 'ts', ARGV[i + 2])
  if ARGV[i] == 'preview' then
    redis.call('HSET', P .. 'pv:' .. id, 'id', eid, 'v', ARGV[i + 1], 'ts', ARGV[i + 2])
  end
  i = i + 3
end
if ARGV[8] == '1' then
  redis.call('XCLAIM', P .. 'queue', GROUP, ARGV[4], 0, ARGV[6], 'JUSTID')
end
if f[4] == '1' then return 1 end
return 0
"""

# ARGV: P GROUP id interest now ttl maxlen dead_idle_ms -> {code, hash}
# code: missing | not_cancellable (finished) | kept | cancelled | cancelling (the owner was asked to stop)
CANCEL = COMMON + lua_set("is_stoppable", STOPPABLE) + r"""
local id, interest, now, ttl, maxlen = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local key = jk(id)
local st = redis.call('HGET', key, 'status')
if not st then return {'missing', {}} end
if not is_stoppable(st) then return {'not_cancellable', redis.call('HGETALL', key)} end
redis.call('SREM', P .. 'int:' .. id, interest)
redis.call('SREM', P .. 'ia:' .. interest, id)
if redis.call('SCARD', P .. 'int:' .. id) > 0 then return {'kept', redis.call('HGETALL', key)} end
local dead = false
if st == 'processing' then
  local msg = redis.call('HGET', key, 'msg')
  local pel = redis.call('XPENDING', P .. 'queue', GROUP, msg, msg, 1)
  dead = (#pel == 0) or (tonumber(pel[1][3]) >= tonumber(ARGV[8]))
end
-- Only a cancellable job ends cancelled here. A generated one's image exists: whatever its worker's
-- state, it gets the flag; a live worker stops the upscale at its next tile and completes the job
-- with the image; a dead one's entry is reclaimed and CLAIM completes it (stop_upscale). Completing
-- it here would mean rewriting its result JSON in Lua (cjson rounds the 63-bit seeds).
if is_cancellable(st) and (st == 'pending' or dead) then
  finish(id, 'cancelled', 'cancelled', '""" + FailureCode.CANCELLED.value + r"""', now, ttl, maxlen)
  return {'cancelled', redis.call('HGETALL', key)}
end
redis.call('HSET', key, 'cancel', '1')
-- Wake the owner's heartbeat (BLPOP on this list) so it reads the flag now: while it upscales it has
-- no step events to carry it. One entry at most; a stale one only costs the worker one STEP call.
local cx = P .. 'cx:' .. id
redis.call('RPUSH', cx, '1')
redis.call('LTRIM', cx, 0, 0)
redis.call('EXPIRE', cx, ttl)
return {'cancelling', redis.call('HGETALL', key)}
"""
