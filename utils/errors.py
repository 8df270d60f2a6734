"""The one exception type for bad user input.

Entry points catch :class:`UserError`, print its message on one line and exit with status 2,
so every library function can report a wrong path, format or value without knowing whether it
runs under a script, a test or a notebook.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, a wrong format, an out-of-range value.

    The message is one sentence that names the problem and the fix.
    """


EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; what a requeued job exits with after saving its state


class NonFiniteLoss(UserError):
    """Training diverged; the caller names where and keeps the last good checkpoint."""


class NonFiniteOutput(UserError):
    """The model produced NaN/inf logits in evaluation: a broken model must not be scored."""


class Preempted(Exception):
    """A stop was requested (SIGTERM/SIGUSR1) and the state at a step boundary has been saved."""
