"""Errors that carry a user-facing message naming what is wrong."""


class InvalidInputError(ValueError):
    """Bad input from a user or a caller: maps to HTTP 422, gRPC INVALID_ARGUMENT, exit code 2."""


class NotFoundError(InvalidInputError):
    """A named file, checkpoint or dataset does not exist: gRPC NOT_FOUND."""


class FieldError(InvalidInputError):
    """Bad value of one named field of a request (HTTP 422 with that field)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
