"""The project's user-facing error types (the base layer: every package raises these)."""


class UserError(Exception):
    """A mistake the user can fix (missing file, unknown model, bad field, ...).

    The CLI prints the message as one line and exits with code 2, never a traceback.
    """


class AdviceError(UserError, ValueError):
    """The request cannot be advised on (bad value, unknown model, unreadable data)."""


class UnknownModel(AdviceError):
    """The advisor cannot find the model's shape offline (not in the catalog, no local config.json)."""
