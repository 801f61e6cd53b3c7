"""The advisor's one user-facing error type."""


class AdviceError(ValueError):
    """The request cannot be advised on (bad value, unknown model, unreadable data)."""
