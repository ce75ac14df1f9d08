"""The job state machine: the one place that says which statuses exist, which changes are legal,
which statuses end a job or may be cancelled, why a job failed, and what a restart does.

Everything else derives from here: the engines (SQLite and Redis), the Lua scripts (their status
sets are generated from ``TERMINAL``, ``CANCELLABLE`` and ``STOPPABLE``, see
``server/cluster/scripts.py``), the WebSocket session's status ordering (``RANK``), metrics
(``ACTIVE``) and the store's recovery.
"""

from __future__ import annotations

from enum import Enum

from server.core.errors import IllegalTransition


class JobStatus(str, Enum):
    PENDING = "pending"  # queued, waiting for the GPU
    PROCESSING = "processing"  # denoising on the GPU
    GENERATED = "generated"  # image saved; upscaling under way
    COMPLETED = "completed"  # all files written; result final
    FAILED = "failed"  # error recorded; resubmitting runs it again
    CANCELLED = "cancelled"  # nobody wanted it any more; resubmitting runs it again

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL

    @property
    def is_active(self) -> bool:
        return self not in TERMINAL

    @property
    def is_cancellable(self) -> bool:
        return self in CANCELLABLE


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE = tuple(status for status in JobStatus if status not in TERMINAL)  # in lifecycle order
# A generated job's image exists; only its upscale is running, so it is not cancelled any more.
CANCELLABLE = frozenset({JobStatus.PENDING, JobStatus.PROCESSING})

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    # pending -> failed: shutdown and restart recovery only; work that never ran is reported, not lost.
    JobStatus.PENDING: frozenset({JobStatus.PROCESSING, JobStatus.CANCELLED, JobStatus.FAILED}),
    # processing -> pending: a reclaim. The job's worker died (Redis: its queue entry went idle and
    # another worker claimed it) or the process restarted; the job runs again from the start.
    JobStatus.PROCESSING: frozenset({JobStatus.PENDING, JobStatus.GENERATED, JobStatus.COMPLETED,
                                     JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.GENERATED: frozenset({JobStatus.COMPLETED, JobStatus.FAILED}),
    # completed -> generated: an upscale retry, as a new attempt (attempt + 1). A job that completed
    # without its upscale (``result.upscale_error``: the upscale failed or a restart cut it short)
    # and is requested again runs the missing upscale; its generated image stays as it is (both
    # backends: ``JobRecord.upscale_retry``; Redis: the SUBMIT script).
    JobStatus.COMPLETED: frozenset({JobStatus.GENERATED}),
    JobStatus.FAILED: frozenset({JobStatus.PENDING}),  # resubmission
    JobStatus.CANCELLED: frozenset({JobStatus.PENDING}),  # resubmission
}

# What a cancel can stop: the cancellable statuses, and a generated job's upscale (that job then
# completes with its image and ``upscale_error``: its status never becomes cancelled).
STOPPABLE = CANCELLABLE | {JobStatus.GENERATED}

# Order of statuses within one attempt: a later rank is newer news (terminal ones tie).
RANK: dict[JobStatus, int] = {JobStatus.PENDING: 0, JobStatus.PROCESSING: 1, JobStatus.GENERATED: 2,
                              JobStatus.COMPLETED: 3, JobStatus.FAILED: 3, JobStatus.CANCELLED: 3}


def check_transition(job_id: str, current: JobStatus, new: JobStatus) -> None:
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"job {job_id[:12]}: {current.value} -> {new.value} is not allowed")


class FailureCode(str, Enum):
    """Why a job ended failed or cancelled; stored on the record (SQLite column, Redis hash field).

    Adapters choose status codes and error types from this, never from the message, which is for
    people only. The values are the ``code`` the OpenAI adapter reports.
    """

    CANCELLED = "job_cancelled"  # every interest in the job was withdrawn
    SHUTDOWN = "shutting_down"  # the server stopped before the job could finish (single node: kept for its restart)
    INTERRUPTED = "interrupted"  # the process died while running it, max_restarts times (single node)
    OUT_OF_MEMORY = "out_of_memory"  # the device ran out of memory
    GENERATION_FAILED = "generation_failed"  # the model raised
    INVALID_ADAPTER = "invalid_adapter"  # a LoRA adapter did not load, or a worker's file differs: the client's 400
    STORAGE = "storage_error"  # the image could not be written
    WORKER_LOST = "worker_lost"  # the job took down max_deliveries workers (Redis backend)
    INTERNAL = "internal_error"  # a bug; the log has the trace


# Default messages (for people) of failures that carry no message of their own.
FAILURE_MESSAGES: dict[FailureCode, str] = {
    FailureCode.CANCELLED: "cancelled",
    FailureCode.SHUTDOWN: ("server shutting down; the job is kept and runs again when the server is back:"
                           " repeat the request to get its image"),
    FailureCode.INTERRUPTED: "interrupted by server restart",
    FailureCode.WORKER_LOST: "taken over by another worker",
}

# Why an upscale stopped, for ``upscale_error`` (the job completes with its image all the same).
UPSCALE_STOP_REASONS: dict[FailureCode, str] = {
    FailureCode.CANCELLED: "cancelled",
    FailureCode.SHUTDOWN: "server shutting down",
}

# What a restart does with the jobs a dead process left unfinished (``JobStore.recover_interrupted``):
# nothing accepted is lost. A pending job stays pending and is queued again in its original order; a
# processing job runs again from the start (processing -> pending, attempt + 1); a generated job
# keeps its image and gets its upscale run. A job that has now been cut short by ``max_restarts``
# process deaths (it may be what kills the process) is not retried: ``RECOVERY_EXHAUSTED`` (a
# generated one completes without its upscale). Pending jobs never ran, so they are never counted.
RESTART_REASON = FAILURE_MESSAGES[FailureCode.INTERRUPTED]
RECOVERY: dict[JobStatus, JobStatus] = {
    JobStatus.PENDING: JobStatus.PENDING,
    JobStatus.PROCESSING: JobStatus.PENDING,
    JobStatus.GENERATED: JobStatus.GENERATED,
}
RECOVERY_EXHAUSTED: dict[JobStatus, JobStatus] = {
    JobStatus.PROCESSING: JobStatus.FAILED,
    JobStatus.GENERATED: JobStatus.COMPLETED,
}


def exhausted_reason(restarts: int) -> str:
    """The message of a job that was not retried after ``restarts`` process deaths."""
    return f"{RESTART_REASON} {restarts} time{'s' if restarts != 1 else ''}; it is not retried"


def lua_set(name: str, statuses) -> str:
    """A Lua predicate ``name(st)`` true for exactly ``statuses``: how the scripts get these sets."""
    tests = " or ".join(f"st == '{status.value}'" for status in sorted(statuses, key=lambda s: (RANK[s], s.value)))
    return f"local function {name}(st) return {tests} end"
