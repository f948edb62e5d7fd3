"""Errors that carry a user-facing message naming what is wrong."""


class InvalidInputError(ValueError):
    """Bad input from a user or a caller: maps to HTTP 422, gRPC INVALID_ARGUMENT, exit code 2."""


class NotFoundError(InvalidInputError):
    """A named file, checkpoint or dataset does not exist: gRPC NOT_FOUND."""
