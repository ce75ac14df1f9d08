"""One domain exception hierarchy; each protocol adapter maps it once.

    ServerError
    ├── InvalidRequest          bad input; carries the offending ``param``
    ├── PayloadTooLarge         a request body over its limit
    ├── ModelNotFound           a model id that is not served
    ├── ModelLoadError          weights missing or unloadable; carries a one-line remedy
    ├── AuthenticationFailed    missing or wrong API key
    ├── NotFound                a file or route that does not exist
    ├── JobNotFound             no job with that id (or not visible to the caller)
    ├── IllegalTransition       a job state change the transition table forbids
    ├── JobNotCancellable       cancel of a job that is already finished
    ├── QueueFull               the queue (or a client's share of it) is at its limit
    ├── ShuttingDown            the server no longer accepts work
    ├── StorageUnavailable      the job database cannot be written (disk full, read-only)
    └── GenerationFailed        the generator raised (incl. out of memory)
        └── OutOfMemory

``JobCancelled`` is not an error: it is raised inside the generator's step callback to stop a
cancelled job at the next step boundary without a VAE decode.
"""

from __future__ import annotations


class ServerError(Exception):
    """Base of every error a client may be told about. ``str(exc)`` is safe to show."""

    code: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(ServerError):
    code = "invalid_value"


class AdapterRejected(InvalidRequest):
    """A LoRA adapter the model layer could not apply (its file does not load into the model, or a
    worker's file differs from the one the job was submitted with): the client's 400, ``param`` loras.
    Raised on the GPU thread, so it reaches the client through the job's failure code."""

    def __init__(self, message: str, *, param: str | None = "loras", code: str | None = None):
        super().__init__(message, param=param, code=code)


class PayloadTooLarge(ServerError):
    code = "request_too_large"


class ModelNotFound(ServerError):
    code = "model_not_found"


class ModelLoadError(ServerError):
    code = "model_load_error"


class AuthenticationFailed(ServerError):
    code = "invalid_api_key"


class NotFound(ServerError):
    code = "not_found"


class JobNotFound(ServerError):
    code = "job_not_found"


class IllegalTransition(ServerError):
    code = "illegal_transition"


class JobNotCancellable(ServerError):
    code = "job_not_cancellable"


class QueueFull(ServerError):
    """``retry_after_s``: when a slot is expected to be free (the queue's drain time), if known."""

    code = "queue_full"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message, param=param, code=code)
        self.retry_after_s = retry_after_s


class ShuttingDown(ServerError):
    code = "shutting_down"


class StorageUnavailable(ServerError):
    code = "storage_unavailable"


class GenerationFailed(ServerError):
    code = "generation_failed"


class OutOfMemory(GenerationFailed):
    code = "out_of_memory"


class JobCancelled(Exception):
    """Raised from a step callback to abandon a cancelled job before the next step."""
