"""The one error hierarchy of pond.

Errors are raised where they are detected and rendered in one place: server.py turns
a PondError into `{"error": {"code", "message", "hint"}}` with the class's status, and
cli.py prints `error: ...` / `hint: ...`. A message names the object and the cause;
a hint says what to do next. Codes are stable: docs/errors.md lists them.
"""


class PondError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message, hint="", code=None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code:
            self.code = code

    def to_json(self):
        return {"error": {"code": self.code, "message": self.message, "hint": self.hint}}


class BadRequest(PondError):
    status = 400
    code = "bad_request"


class SandboxInvalid(BadRequest):
    """A job's sandbox block that pond will not take (specs/sandbox.md §5): well-formed JSON, a bad policy."""

    status = 422
    code = "sandbox_invalid"


class Unauthorized(PondError):
    status = 401
    code = "unauthorized"


class Forbidden(PondError):
    status = 403
    code = "forbidden"


class NotFound(PondError):
    status = 404
    code = "not_found"


class MethodNotAllowed(PondError):
    status = 405
    code = "method_not_allowed"


class Conflict(PondError):
    status = 409
    code = "conflict"


class Gone(PondError):
    """A one-time or expiring thing (a code) that was valid once and is not any more."""

    status = 410
    code = "gone"


class PayloadTooLarge(PondError):
    status = 413
    code = "payload_too_large"


class HeadersTooLarge(PondError):
    status = 431
    code = "headers_too_large"


class Unavailable(PondError):
    status = 503
    code = "unavailable"


class StorageUnavailable(Unavailable):
    """pond cannot write its state dir now (disk full, I/O error, database locked). Nothing is
    half-written: the transaction was rolled back. pond recovers by itself once it can write."""

    code = "storage_unavailable"


class Unhealthy(Unavailable):
    """/healthz: a loop of pond is dead, stalled or retrying, or its storage fails."""

    code = "unhealthy"


class InvalidTransition(Conflict):
    """A job state change that the transition table (jobs.TRANSITIONS) does not allow."""

    code = "invalid_transition"

    def __init__(self, job_id, from_state, to_state):
        super().__init__(
            f"job {job_id}: cannot go from {from_state} to {to_state}",
            "read the job with `pond job ID`; specs/states.md lists the allowed transitions",
        )
        self.job_id, self.from_state, self.to_state = job_id, from_state, to_state


class StaleAttempt(Conflict):
    """A report for an attempt that is no longer the job's current one (fencing)."""

    code = "stale_attempt"


class ConfigError(PondError):
    """Bad settings at start-up; never an HTTP answer."""

    code = "config"


class RegistryInvalid(BadRequest):
    """A harness, a model or an agent block that pond will not take (specs/agents.md): the message names the field."""

    status = 422
    code = "registry_invalid"
