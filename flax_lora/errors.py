"""The training backend's one user-facing error type."""


class UserError(Exception):
    """A mistake the user can fix (missing file, unknown model, bad field, ...).

    The CLI prints the message as one line and exits with code 2.
    """


class Diverged(UserError):
    """Training produced a non-finite loss or gradient norm; the last good checkpoint was kept (exit 2)."""


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped training after a checkpoint was saved; ``exit_code`` is 130 / 143."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
