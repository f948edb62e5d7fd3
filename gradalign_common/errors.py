"""Errors that carry a user-facing message naming what is wrong (and RequestCancelled, a worker's internal
signal that its caller went away)."""


class InvalidInputError(ValueError):
    """Bad input from a user or a caller: maps to HTTP 422, gRPC INVALID_ARGUMENT, exit code 2."""


class NotFoundError(InvalidInputError):
    """A named file, checkpoint or dataset does not exist: gRPC NOT_FOUND."""


class FieldError(InvalidInputError):
    """Bad value of one named field of a request (HTTP 422 with that field); `location` is where the field is
    (the request's "body" or its "query" string)."""

    def __init__(self, field: str, message: str, location: str = "body"):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.location = location


class ConflictError(InvalidInputError):
    """The request is well formed but the resource's current state does not allow it (e.g. resuming a running
    experiment): HTTP 409."""


class ZeroValidationGradientError(InvalidInputError):
    """The validation gradient g_V is zero (every validation group has zero advantage) or not finite, so no
    cosine to it exists: gRPC FAILED_PRECONDITION. The round policy (gradalign_common.round_policy) then
    selects the round at random and says so."""


class RequestConflictError(InvalidInputError):
    """A request reuses the request_id of an earlier request with a different body: gRPC ALREADY_EXISTS.

    A request_id names one piece of work; answering a changed body under it from (or over) the
    earlier result would hand the caller output that does not match what it asked for.
    """

    def __init__(self, request_id: str, where: str):
        super().__init__(
            f"request_id {request_id!r} was already used with a different request body for {where}; "
            "use a new request_id for a changed request"
        )
        self.request_id = request_id


class WorkerBusyError(Exception):
    """A worker has no free request slot (gradalign_common.request_gate): gRPC RESOURCE_EXHAUSTED, retry later."""


class RequestCancelled(Exception):
    """The caller cancelled the RPC (or went away) while the worker was busy with it.

    Raised from inside long work (a progress callback, a step loop) so that it stops at the next
    check; `grpc_utils.rpc_errors` ends the stream quietly. Not a user-facing error.
    """
