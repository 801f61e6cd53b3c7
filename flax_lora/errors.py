"""The training backend's one user-facing error type."""


class UserError(Exception):
    """A mistake the user can fix (missing file, unknown model, bad field, ...).

    The CLI prints the message as one line and exits with code 2.
    """
