"""The training backend's error types: the project's UserError (exit 2) and two run outcomes."""

from advisor.errors import UserError

__all__ = ["Diverged", "Interrupted", "UserError"]


class Diverged(UserError):
    """Training produced a non-finite loss or gradient norm; the last good checkpoint was kept (exit 2)."""


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped training after a checkpoint was saved; ``exit_code`` is 130 / 143."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
